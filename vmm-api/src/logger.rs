//! A `log` logger whose destination `PUT /logger` can set: until then every
//! record goes to a fallback logger (the reference VMM's: stderr, filtered
//! by `RUST_LOG`); after, to the file or named pipe, filtered by the API's
//! level and module, one line per record in Firecracker's layout:
//! `2026-11-29T03:56:17.123456789 [ID:THREAD:LEVEL:FILE:LINE] message` (level
//! and origin when asked for).

use std::fs::File;
use std::io::Write;
use std::sync::{Mutex, OnceLock};

use log::{LevelFilter, Log, Metadata, Record};

use crate::model::LoggerConfig;

struct Destination {
    out: File,
    id: String,
    level: LevelFilter,
    show_level: bool,
    show_origin: bool,
    module: Option<String>,
}

/// The process's logger (see the [module documentation](self)).
pub struct ApiLogger {
    fallback: Box<dyn Log>,
    fallback_level: LevelFilter,
    dest: Mutex<Option<Destination>>,
}

static LOGGER: OnceLock<&'static ApiLogger> = OnceLock::new();

/// Why the logger could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum LoggerError {
    /// Another logger was installed first.
    #[error("another logger is installed")]
    OtherLogger,
    /// `install` was not called.
    #[error("the logger is not installed")]
    NotInstalled,
    /// The logger was configured already.
    #[error("the logger is already configured")]
    AlreadyConfigured,
}

impl ApiLogger {
    /// Installs the process's logger with `fallback` (enabled up to
    /// `fallback_level`) until a destination is configured.
    pub fn install(
        fallback: Box<dyn Log>,
        fallback_level: LevelFilter,
    ) -> Result<&'static ApiLogger, LoggerError> {
        let logger: &'static ApiLogger = Box::leak(Box::new(ApiLogger {
            fallback,
            fallback_level,
            dest: Mutex::new(None),
        }));
        log::set_logger(logger).map_err(|_| LoggerError::OtherLogger)?;
        log::set_max_level(fallback_level);
        let _ = LOGGER.set(logger);
        Ok(logger)
    }

    /// The installed logger.
    pub fn get() -> Result<&'static ApiLogger, LoggerError> {
        LOGGER.get().copied().ok_or(LoggerError::NotInstalled)
    }

    /// Sends the log to `out` as `config` says (once; Firecracker's
    /// logger is configured once too).
    pub fn configure(
        &self,
        config: &LoggerConfig,
        out: File,
        instance_id: &str,
    ) -> Result<(), LoggerError> {
        let mut dest = self.dest.lock().map_err(|_| LoggerError::NotInstalled)?;
        if dest.is_some() {
            return Err(LoggerError::AlreadyConfigured);
        }
        let level = config.level.map_or(LevelFilter::Info, |l| l.filter());
        *dest = Some(Destination {
            out,
            id: instance_id.to_string(),
            level,
            show_level: config.show_level,
            show_origin: config.show_log_origin,
            module: config.module.clone(),
        });
        log::set_max_level(level);
        Ok(())
    }
}

impl Log for ApiLogger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        match self.dest.lock().ok().as_deref() {
            Some(Some(d)) => {
                metadata.level() <= d.level
                    && d.module
                        .as_deref()
                        .is_none_or(|m| metadata.target().starts_with(m))
            }
            _ => metadata.level() <= self.fallback_level && self.fallback.enabled(metadata),
        }
    }

    fn log(&self, record: &Record<'_>) {
        let Ok(mut guard) = self.dest.lock() else {
            return;
        };
        let Some(d) = guard.as_mut() else {
            drop(guard);
            if self.enabled(record.metadata()) {
                self.fallback.log(record);
            }
            return;
        };
        if record.level() > d.level
            || !d
                .module
                .as_deref()
                .is_none_or(|m| record.target().starts_with(m))
        {
            return;
        }
        let thread = std::thread::current();
        let mut line = format!(
            "{} [{}:{}",
            utc_timestamp(std::time::SystemTime::now()),
            d.id,
            thread.name().unwrap_or("?")
        );
        if d.show_level {
            line.push_str(&format!(":{}", record.level()));
        }
        if d.show_origin {
            line.push_str(&format!(
                ":{}:{}",
                record.file().unwrap_or("?"),
                record.line().unwrap_or(0)
            ));
        }
        line.push_str(&format!("] {}\n", record.args()));
        // A named pipe nobody reads loses the line rather than stalling a
        // VMM thread.
        let _ = d.out.write_all(line.as_bytes());
    }

    fn flush(&self) {
        self.fallback.flush();
    }
}

/// `t` as `YYYY-MM-DDTHH:MM:SS.NNNNNNNNN` in UTC.
fn utc_timestamp(t: std::time::SystemTime) -> String {
    let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:09}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        d.subsec_nanos()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn timestamps_are_utc_civil_dates() {
        assert_eq!(utc_timestamp(UNIX_EPOCH), "1970-01-01T00:00:00.000000000");
        let t = UNIX_EPOCH + Duration::new(951_782_400 + 3_723, 5);
        assert_eq!(
            utc_timestamp(t),
            "2000-02-29T01:02:03.000000005",
            "a leap day"
        );
        let t = UNIX_EPOCH + Duration::from_secs(1_796_096_177);
        assert_eq!(utc_timestamp(t), "2026-12-01T03:36:17.000000000");
    }
}

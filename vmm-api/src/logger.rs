//! A `log` logger whose destination `PUT /logger` can set: until then every
//! record goes to a fallback logger (the reference VMM's: stderr, filtered
//! by `RUST_LOG`); after, to the file or named pipe, filtered by the API's
//! level and module.

use std::fs::File;
use std::io::Write;
use std::sync::{Mutex, OnceLock};

use log::{LevelFilter, Log, Metadata, Record};

use crate::model::LoggerConfig;

struct Destination {
    out: File,
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
    pub fn configure(&self, config: &LoggerConfig, out: File) -> Result<(), LoggerError> {
        let mut dest = self.dest.lock().map_err(|_| LoggerError::NotInstalled)?;
        if dest.is_some() {
            return Err(LoggerError::AlreadyConfigured);
        }
        let level = config.level.map_or(LevelFilter::Info, |l| l.filter());
        *dest = Some(Destination {
            out,
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
        let mut line = String::new();
        if d.show_level {
            line.push_str(&format!("[{}] ", record.level()));
        }
        if d.show_origin {
            line.push_str(&format!(
                "[{}:{}] ",
                record.file().unwrap_or("?"),
                record.line().unwrap_or(0)
            ));
        }
        line.push_str(&format!("{}\n", record.args()));
        // A named pipe nobody reads loses the line rather than stalling a
        // VMM thread.
        let _ = d.out.write_all(line.as_bytes());
    }

    fn flush(&self) {
        self.fallback.flush();
    }
}

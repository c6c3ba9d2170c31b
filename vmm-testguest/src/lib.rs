//! The test guest: a small `no_std` x86_64 program that boots like Linux, by
//! the 64-bit Linux boot protocol or by PVH, and drives a VMM's devices from
//! inside. Its image is built from source when this crate builds and is
//! embedded as [`IMAGE`].
//!
//! The guest reads `testguest.*` keys from its kernel command line:
//! - `testguest.run=NAME[,NAME...]`: scenarios to run in order (default `hello`);
//! - `testguest.exit=N`: the status the `exit` scenario ends with;
//! - `testguest.exit_port=PORT`: the port it writes its exit status to
//!   (default [`DEFAULT_EXIT_PORT`]).
//!
//! It reports on COM1 (0x3f8), one line per event, each starting with
//! [`LINE_PREFIX`], and ends by writing its status byte to the exit port.
//!
//! Scenarios:
//! - `hello`: reports the boot protocol and the RAM it found in the memory map;
//! - `exit`: ends with `testguest.exit`;
//! - `reset`: asks for a reset through the i8042 (command 0xFE on port 0x64);
//! - `spin`: reports, then loops at CPL3 forever (for stop and pause tests);
//! - `kbd`: probes the i8042 and its keyboard, reports `kbd ready`, waits for
//!   Ctrl-Alt-Del and then asks for a reset (what Linux does with `reboot=k`);
//! - `blk`, `rng`, `console` and their interrupt-driven twins `blk-irq`,
//!   `rng-irq`, `console-irq`: drive every virtio-mmio device of that type
//!   named by `virtio_mmio.device=<size>@<addr>:<irq>` entries, polling the
//!   used ring or waiting for the interrupt through the IOAPIC and LAPIC.
//!   `blk` reads each disk's id and capacity; on writable disks it writes
//!   [`shared::blk_pattern_byte`] at [`shared::BLK_PATTERN_SECTOR`], flushes,
//!   reads it back and checks a read past the end fails; on read-only disks
//!   it checks a write fails. `rng` checks two requests come back full and
//!   different. `console` writes [`shared::CONSOLE_MESSAGE`];
//! - `hostile`: breaks the virtio rules on the first disk in eighteen ways and
//!   checks each is refused, ignored or answered with DEVICE_NEEDS_RESET;
//! - `bench-pio`, `bench-mmio`, `bench-virtio`, `bench-virtio-irq`: time
//!   `testguest.bench_iters=N` exits or rng round trips with the TSC and
//!   report cycles per operation.
//!
//! An unknown name ends the guest with [`exit_status::UNKNOWN_SCENARIO`].
//!
//! ```
//! use vmm_testguest::{parse_line, Report};
//!
//! let r = parse_line("testguest: hello proto=pvh mem_mib=128").unwrap();
//! assert_eq!(r.event, "hello");
//! assert_eq!(r.get("proto"), Some("pvh"));
//! assert_eq!(r.get_u64("mem_mib"), Some(128));
//! assert!(parse_line("Linux version 6.1").is_none());
//! # let _: Option<Report> = None;
//! ```

#![deny(missing_docs)]

/// The guest's ELF image: PVH note and a 64-bit Linux entry, loaded at 1 MiB.
pub static IMAGE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/testguest.elf"));

/// Port the guest writes its exit status to unless told otherwise.
pub const DEFAULT_EXIT_PORT: u16 = 0xf4;

/// Prefix of every line the guest prints.
pub const LINE_PREFIX: &str = "testguest: ";

/// Exit statuses of the guest.
pub mod exit_status {
    /// Every scenario passed.
    pub const OK: u8 = 0;
    /// A scenario failed.
    pub const FAILED: u8 = 3;
    /// `testguest.run=` named a scenario the guest does not have.
    pub const UNKNOWN_SCENARIO: u8 = 4;
    /// A CPU exception reached the guest's IDT.
    pub const EXCEPTION: u8 = 5;
    /// The guest panicked.
    pub const PANIC: u8 = 6;
    /// The boot information was unusable.
    pub const BAD_BOOT: u8 = 7;
}

/// One parsed report line: `testguest: EVENT key=value key=value ...`.
/// Words without `=` after the event are kept in `words`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    /// The first word after the prefix (`boot`, `hello`, `done`, `error`, ...).
    pub event: String,
    /// `key=value` pairs in order.
    pub fields: Vec<(String, String)>,
    /// Other words in order.
    pub words: Vec<String>,
}

impl Report {
    /// The value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The value of `key` as a decimal or `0x` hexadecimal number.
    pub fn get_u64(&self, key: &str) -> Option<u64> {
        let v = self.get(key)?;
        match v.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16).ok(),
            None => v.parse().ok(),
        }
    }
}

/// Parses one line of guest output; `None` if it is not a report line.
pub fn parse_line(line: &str) -> Option<Report> {
    let rest = line
        .trim_end_matches(['\r', '\n'])
        .strip_prefix(LINE_PREFIX)?;
    let mut parts = rest.split_whitespace();
    let event = parts.next()?.to_string();
    let mut fields = Vec::new();
    let mut words = Vec::new();
    for p in parts {
        match p.split_once('=') {
            Some((k, v)) => fields.push((k.to_string(), v.to_string())),
            None => words.push(p.to_string()),
        }
    }
    Some(Report {
        event,
        fields,
        words,
    })
}

/// Every report line in `output`, in order.
pub fn parse_output(output: &str) -> Vec<Report> {
    output.lines().filter_map(parse_line).collect()
}

/// Constants the guest's scenarios and the host's tests share: the `blk`
/// pattern and the `console` message.
#[path = "../guest/shared.rs"]
pub mod shared;

/// The guest's own command-line parser, compiled for the host so that it is
/// tested like any other code.
#[cfg(test)]
#[path = "../guest/cmdline.rs"]
#[allow(dead_code)]
mod guest_cmdline;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_is_an_x86_64_elf() {
        assert_eq!(&IMAGE[..4], b"\x7fELF");
        assert_eq!(u16::from_le_bytes([IMAGE[18], IMAGE[19]]), 62);
    }

    #[test]
    fn report_lines_parse_into_event_fields_and_words() {
        let r = parse_line("testguest: error unknown scenario \"foo\" code=0x10\r\n").unwrap();
        assert_eq!(r.event, "error");
        assert_eq!(r.words, vec!["unknown", "scenario", "\"foo\""]);
        assert_eq!(r.get_u64("code"), Some(16));
        assert_eq!(r.get("missing"), None);
        assert!(parse_line("testguest:").is_none());
        assert!(parse_line("other: hello").is_none());
    }

    #[test]
    fn guest_parses_its_keys_and_ignores_the_rest() {
        let line: &'static [u8] = b"console=ttyS0 testguest.run=hello,,exit testguest.exit=42 testguest.exit_port=0x501 quiet";
        let args = guest_cmdline::Args::parse(line);
        assert_eq!(args.scenarios().collect::<Vec<_>>(), vec!["hello", "exit"]);
        assert_eq!(args.exit_status, Some(42));
        assert_eq!(args.exit_port, Some(0x501));
        let defaults = guest_cmdline::Args::parse(b"");
        assert_eq!(defaults.scenarios().collect::<Vec<_>>(), vec!["hello"]);
        assert_eq!((defaults.exit_status, defaults.exit_port), (None, None));
    }

    #[test]
    fn guest_rejects_out_of_range_and_malformed_numbers() {
        assert_eq!(guest_cmdline::parse_u64(b"0x10"), Some(16));
        assert_eq!(guest_cmdline::parse_u64(b"99"), Some(99));
        assert_eq!(guest_cmdline::parse_u64(b"0x"), None);
        assert_eq!(guest_cmdline::parse_u64(b"12a"), None);
        assert_eq!(guest_cmdline::parse_u64(b"99999999999999999999999"), None);
        let args = guest_cmdline::Args::parse(b"testguest.exit=256 testguest.exit_port=70000");
        assert_eq!((args.exit_status, args.exit_port), (None, None));
    }

    #[test]
    fn guest_bounds_the_number_of_scenarios() {
        let many: &'static [u8] = b"testguest.run=a,a,a,a,a,a,a,a,a,a,a,a,a,a,a,a,a,a,a,a";
        assert_eq!(guest_cmdline::Args::parse(many).scenarios().count(), 16);
    }

    #[test]
    fn parse_output_skips_foreign_lines() {
        let out = "noise\ntestguest: boot proto=pvh\nmore\ntestguest: done status=0\n";
        let events: Vec<_> = parse_output(out).into_iter().map(|r| r.event).collect();
        assert_eq!(events, vec!["boot", "done"]);
    }
}

//! The guest's own command line keys (`testguest.*`); other words are ignored.

/// Most scenarios one `testguest.run=` may name.
const MAX_SCENARIOS: usize = 16;

/// Parsed `testguest.*` keys.
pub struct Args {
    run: &'static [u8],
    /// `testguest.exit=N`.
    pub exit_status: Option<u8>,
    /// `testguest.exit_port=PORT`.
    pub exit_port: Option<u16>,
    /// `testguest.bench_iters=N`: iterations of the `bench-*` loops.
    pub bench_iters: Option<u64>,
    /// `testguest.pio=ACCESS[,ACCESS...]`: the `pio` scenario's accesses.
    pub pio: &'static [u8],
    /// `testguest.mmio=ACCESS[,ACCESS...]`: the `mmio` scenario's accesses.
    pub mmio: &'static [u8],
    /// `testguest.virtio=TYPE:QUEUE:HEX:LEN`: the `virtio` scenario's request.
    pub virtio: &'static [u8],
    /// `testguest.probe_config=N`: configuration bytes `probe` shows.
    pub probe_config: Option<u64>,
}

impl Args {
    /// Parses the command line; later keys win over earlier ones.
    pub fn parse(cmdline: &'static [u8]) -> Args {
        let mut args = Args {
            run: b"hello",
            exit_status: None,
            exit_port: None,
            bench_iters: None,
            pio: b"",
            mmio: b"",
            virtio: b"",
            probe_config: None,
        };
        for word in cmdline.split(|&b| b == b' ' || b == b'\t' || b == b'\n') {
            let Some(eq) = word.iter().position(|&b| b == b'=') else {
                continue;
            };
            let (key, value) = (&word[..eq], &word[eq + 1..]);
            match key {
                b"testguest.run" => args.run = value,
                b"testguest.exit" => {
                    args.exit_status = parse_u64(value).and_then(|v| u8::try_from(v).ok())
                }
                b"testguest.exit_port" => {
                    args.exit_port = parse_u64(value).and_then(|v| u16::try_from(v).ok())
                }
                b"testguest.bench_iters" => args.bench_iters = parse_u64(value).filter(|&n| n > 0),
                b"testguest.pio" => args.pio = value,
                b"testguest.mmio" => args.mmio = value,
                b"testguest.virtio" => args.virtio = value,
                b"testguest.probe_config" => args.probe_config = parse_u64(value),
                _ => {}
            }
        }
        args
    }

    /// The scenario names, in order (empty names are skipped).
    pub fn scenarios(&self) -> impl Iterator<Item = &'static str> {
        let run: &'static [u8] = self.run;
        run.split(|&b| b == b',')
            .filter(|n| !n.is_empty())
            .take(MAX_SCENARIOS)
            .map(|n| core::str::from_utf8(n).unwrap_or("<not utf-8>"))
    }
}

/// Parses a decimal or `0x` hexadecimal number.
pub fn parse_u64(s: &[u8]) -> Option<u64> {
    let (digits, radix) = match s {
        [b'0', b'x' | b'X', rest @ ..] => (rest, 16),
        _ => (s, 10),
    };
    if digits.is_empty() {
        return None;
    }
    let mut v: u64 = 0;
    for &c in digits {
        let d = (c as char).to_digit(radix)? as u64;
        v = v.checked_mul(radix as u64)?.checked_add(d)?;
    }
    Some(v)
}

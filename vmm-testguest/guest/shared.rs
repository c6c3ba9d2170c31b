//! Constants the guest and the host tests share (this file is compiled into
//! both).

/// First sector of the pattern the `blk` scenarios write.
pub const BLK_PATTERN_SECTOR: u64 = 8;
/// Bytes of the pattern.
pub const BLK_PATTERN_LEN: usize = 4096;

/// Byte `i` of the pattern the `blk` scenarios write (`mode` 0 for polled,
/// 1 for interrupt-driven, so the two runs leave different data).
pub fn blk_pattern_byte(i: usize, mode: u8) -> u8 {
    ((i.wrapping_mul(31).wrapping_add(7)) ^ (i >> 8) ^ (usize::from(mode) * 0x5a)) as u8
}

/// What the `console` scenarios write on the virtio console.
pub const CONSOLE_MESSAGE: &str = "hello from the test guest over virtio-console\n";

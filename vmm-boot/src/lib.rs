//! Boot loading for x86_64 guests: kernel images (ELF `vmlinux`, PVH ELF,
//! bzImage), whose headers this crate parses once, bounded, and loads from;
//! the command line, the initrd, the Linux zero page or PVH start info with
//! an e820 map (linux-loader's structures); and the boot CPU state returned
//! as plain data.
//!
//! Nothing here touches KVM: the caller applies [`BootCpuState`] to its vCPU.
//!
//! ```
//! use std::io::Cursor;
//! use vmm_boot::{boot_guest, BootConfig, BootProtocol, ProtocolChoice};
//! use vmm_memory::{create_guest_ram, AddressMap, RamBacking};
//!
//! let map = AddressMap::new(32 << 20)?;
//! let mem = create_guest_ram(&map, RamBacking::Anonymous)?;
//! let config = BootConfig {
//!     protocol: ProtocolChoice::Force(BootProtocol::Linux64),
//!     cmdline: "console=ttyS0 testguest.run=hello",
//!     acpi_rsdp: None,
//! };
//! let setup = boot_guest(&mem, &map, &mut Cursor::new(vmm_testguest::IMAGE), None::<&mut Cursor<&[u8]>>, &config)?;
//! assert_eq!(setup.protocol, BootProtocol::Linux64);
//! assert_eq!(setup.cpu.rsi, vmm_boot::layout::ZERO_PAGE_START);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![deny(missing_docs)]

pub mod acpi;
pub mod cpu;
mod error;
mod image;
pub mod layout;
mod load;
pub mod params;
#[cfg(any(test, feature = "test-utils"))]
pub mod test_utils;

use std::io::{Read, Seek};

use linux_loader::cmdline::Cmdline;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, ReadVolatile};
use vmm_memory::{AddressMap, GuestRange};

pub use cpu::{BootCpuState, DescriptorTable, Segment};
pub use error::BootError;
pub use image::{inspect_kernel, BootProtocol, ImageError, KernelFormat, KernelInfo};
pub use load::{load_initrd, load_kernel, LoadedKernel};

use layout::{CMDLINE_MAX_SIZE, CMDLINE_START};

/// Which protocol to boot by.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ProtocolChoice {
    /// The image's preferred protocol: PVH when it has the note, else the
    /// 64-bit Linux protocol.
    #[default]
    Auto,
    /// This protocol, or an error if the image lacks it.
    Force(BootProtocol),
}

/// What to boot with, besides the images.
#[derive(Clone, Copy, Debug, Default)]
pub struct BootConfig<'a> {
    /// Protocol selection.
    pub protocol: ProtocolChoice,
    /// The kernel command line.
    pub cmdline: &'a str,
    /// Where the ACPI RSDP is (from [`acpi::write_acpi_tables`]), for the
    /// zero page and the PVH start info.
    pub acpi_rsdp: Option<u64>,
}

/// A guest ready to run: what was loaded and the state of the boot vCPU.
#[derive(Clone, Debug)]
pub struct BootSetup {
    /// The protocol chosen.
    pub protocol: BootProtocol,
    /// What the kernel image is.
    pub kernel: KernelInfo,
    /// Where the kernel's bytes went.
    pub kernel_loaded: GuestRange,
    /// Where the initrd went.
    pub initrd: Option<GuestRange>,
    /// The boot vCPU's state.
    pub cpu: BootCpuState,
}

/// Loads the kernel (and initrd), writes the command line and boot
/// parameters, and returns the boot vCPU state.
pub fn boot_guest<M, K, I>(
    mem: &M,
    map: &AddressMap,
    kernel: &mut K,
    initrd: Option<&mut I>,
    config: &BootConfig<'_>,
) -> Result<BootSetup, BootError>
where
    M: GuestMemoryBackend,
    K: Read + ReadVolatile + Seek,
    I: Read + ReadVolatile + Seek,
{
    let cmdline = build_cmdline(config.cmdline)?;
    let loaded = load_kernel(mem, map, kernel)?;
    let protocol = match config.protocol {
        ProtocolChoice::Auto => loaded.info.protocols[0],
        ProtocolChoice::Force(p) if loaded.info.supports(p) => p,
        ProtocolChoice::Force(protocol) => {
            return Err(BootError::ProtocolUnsupported {
                protocol,
                format: loaded.info.format,
            })
        }
    };
    let hdr = loaded.setup_header;
    if let Some(h) = hdr.filter(|h| h.version >= 0x0206 && h.cmdline_size > 0) {
        let len = cmdline
            .as_cstring()
            .map_err(BootError::Cmdline)?
            .as_bytes_with_nul()
            .len();
        if len > h.cmdline_size as usize + 1 {
            return Err(BootError::CmdlineTooLong {
                len,
                max: h.cmdline_size as usize + 1,
            });
        }
    }
    let bytes = cmdline.as_cstring().map_err(BootError::Cmdline)?;
    mem.write_slice(bytes.as_bytes_with_nul(), GuestAddress(CMDLINE_START))
        .map_err(BootError::Memory)?;
    let cmdline_len = bytes.as_bytes_with_nul().len();

    let kernel_end = loaded.loaded.end();
    let initrd = match initrd {
        Some(f) => Some(load_initrd(
            mem,
            map,
            f,
            kernel_end,
            hdr.map(|h| u64::from(h.initrd_addr_max))
                .filter(|&m| m != 0),
        )?),
        None => None,
    };

    let cpu = match protocol {
        BootProtocol::Linux64 => {
            let params = params::LinuxParams {
                setup_header: hdr,
                cmdline: (CMDLINE_START, cmdline_len),
                initrd,
                acpi_rsdp: config.acpi_rsdp,
            };
            let zero_page = params::write_zero_page(mem, map, &params)?;
            cpu::linux64_cpu_state(mem, loaded.entry64, zero_page)?
        }
        BootProtocol::Pvh => {
            let Some(entry) = loaded.pvh_entry else {
                return Err(BootError::ProtocolUnsupported {
                    protocol,
                    format: loaded.info.format,
                });
            };
            let start_info =
                params::write_pvh_start_info(mem, map, CMDLINE_START, initrd, config.acpi_rsdp)?;
            cpu::pvh_cpu_state(mem, entry, start_info)?
        }
    };
    Ok(BootSetup {
        protocol,
        kernel: loaded.info,
        kernel_loaded: loaded.loaded,
        initrd,
        cpu,
    })
}

/// Checks a kernel command line's length and characters: what the boot
/// protocols can carry (printable ASCII and spaces, NUL-terminated within
/// the limit).
///
/// ```
/// assert!(vmm_boot::check_cmdline("console=ttyS0 reboot=k").is_ok());
/// let e = vmm_boot::check_cmdline("console=ttyS0\n").unwrap_err();
/// assert!(e.to_string().contains("'\\n' at position 13"));
/// ```
pub fn check_cmdline(s: &str) -> Result<(), BootError> {
    if s.len() + 1 > CMDLINE_MAX_SIZE {
        return Err(BootError::CmdlineTooLong {
            len: s.len() + 1,
            max: CMDLINE_MAX_SIZE,
        });
    }
    // linux-loader takes printable ASCII and spaces only; say which
    // character is not, and where, before it refuses the whole line.
    if let Some((at, c)) = s
        .char_indices()
        .find(|(_, c)| !(c.is_ascii_graphic() || *c == ' '))
    {
        return Err(BootError::CmdlineCharacter {
            character: c,
            position: s[..at].chars().count(),
        });
    }
    Ok(())
}

/// The command line as linux-loader holds it, after checking its length
/// and characters.
fn build_cmdline(s: &str) -> Result<Cmdline, BootError> {
    check_cmdline(s)?;
    let mut c = Cmdline::new(CMDLINE_MAX_SIZE).map_err(BootError::Cmdline)?;
    if !s.trim().is_empty() {
        c.insert_str(s).map_err(BootError::Cmdline)?;
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;
    use vm_memory::Bytes;

    fn setup() -> (AddressMap, vmm_memory::GuestRam) {
        let map = AddressMap::new(32 << 20).unwrap();
        let mem = vmm_memory::create_guest_ram(&map, vmm_memory::RamBacking::Anonymous).unwrap();
        (map, mem)
    }

    fn boot(
        protocol: ProtocolChoice,
        cmdline: &str,
    ) -> Result<(BootSetup, vmm_memory::GuestRam), BootError> {
        let (map, mem) = setup();
        let config = BootConfig {
            protocol,
            cmdline,
            acpi_rsdp: None,
        };
        let s = boot_guest(
            &mem,
            &map,
            &mut Cursor::new(vmm_testguest::IMAGE),
            None::<&mut Cursor<&[u8]>>,
            &config,
        )?;
        Ok((s, mem))
    }

    #[test]
    fn auto_picks_pvh_for_an_image_with_the_note() {
        let (s, mem) = boot(ProtocolChoice::Auto, "a=b").unwrap();
        assert_eq!(s.protocol, BootProtocol::Pvh);
        assert_eq!(s.cpu.rip, s.kernel.pvh_entry.unwrap());
        let mut buf = [0u8; 4];
        mem.read_slice(&mut buf, GuestAddress(CMDLINE_START))
            .unwrap();
        assert_eq!(&buf, b"a=b\0");
    }

    #[test]
    fn forced_linux64_enters_at_the_elf_entry() {
        let (s, _) = boot(ProtocolChoice::Force(BootProtocol::Linux64), "").unwrap();
        assert_eq!(s.protocol, BootProtocol::Linux64);
        assert_eq!(s.cpu.rip, s.kernel.entry64.unwrap());
    }

    #[test]
    fn pvh_on_an_image_without_the_note_is_refused() {
        let (map, mem) = setup();
        let elf = test_utils::tiny_elf(0x20_0000, &[0xf4; 8], 8, None);
        let config = BootConfig {
            protocol: ProtocolChoice::Force(BootProtocol::Pvh),
            cmdline: "",
            acpi_rsdp: None,
        };
        assert!(matches!(
            boot_guest(
                &mem,
                &map,
                &mut Cursor::new(elf),
                None::<&mut Cursor<&[u8]>>,
                &config
            ),
            Err(BootError::ProtocolUnsupported {
                protocol: BootProtocol::Pvh,
                format: KernelFormat::Elf
            })
        ));
    }

    #[test]
    fn bad_command_lines_are_refused() {
        assert!(matches!(
            boot(ProtocolChoice::Auto, "a\u{1}b"),
            Err(BootError::CmdlineCharacter {
                character: '\u{1}',
                position: 1
            })
        ));
        match boot(ProtocolChoice::Auto, "console=ttyS0 é") {
            Err(e @ BootError::CmdlineCharacter { position: 14, .. }) => {
                assert!(e.to_string().contains("'é' at position 14"), "{e}")
            }
            other => panic!("accepted a non-ASCII command line: {other:?}"),
        }
        let long = "x".repeat(CMDLINE_MAX_SIZE);
        assert!(matches!(
            boot(ProtocolChoice::Auto, &long),
            Err(BootError::CmdlineTooLong { .. })
        ));
    }

    #[test]
    fn bzimage_boots_by_linux64_at_load_address_plus_0x200_with_its_header() {
        let (map, mem) = setup();
        let bz = test_utils::tiny_bzimage(0x020f, 1, &[0x90; 4096]);
        let mut initrd = Cursor::new(vec![7u8; 100]);
        let config = BootConfig {
            protocol: ProtocolChoice::Auto,
            cmdline: "root=/dev/vda",
            acpi_rsdp: None,
        };
        let s = boot_guest(&mem, &map, &mut Cursor::new(bz), Some(&mut initrd), &config).unwrap();
        assert_eq!(s.protocol, BootProtocol::Linux64);
        assert_eq!(s.cpu.rip, 0x10_0200);
        let zp = s.cpu.rsi;
        // The image's own header fields survive, ours are set.
        assert_eq!(
            mem.read_obj::<u16>(GuestAddress(zp + 0x206)).unwrap(),
            0x020f
        );
        assert_eq!(mem.read_obj::<u8>(GuestAddress(zp + 0x210)).unwrap(), 0xff);
        let (addr, size) = s.initrd.map(|r| (r.start(), r.len())).unwrap();
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress(zp + 0x218)).unwrap() as u64,
            addr
        );
        assert_eq!(size, 100);
    }
}

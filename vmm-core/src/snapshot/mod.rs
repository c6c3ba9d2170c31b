//! Snapshots: what a VM's state file holds ([`SnapshotState`]), how it is
//! written and read, and what taking and restoring one asks for
//! ([`SnapshotRequest`], [`RestoreConfig`]).
//!
//! A paused VM is saved with [`VmHandle::snapshot`](crate::VmHandle::snapshot)
//! into two files: the state file (below) and the memory file
//! ([`vmm_memory::snapshot`]). It is restored by building a VM from a
//! [`VmConfig`](crate::VmConfig) whose
//! [`restore`](crate::VmConfig::restore) names them: the builder makes the
//! same machine, maps memory from the file instead of loading a kernel and
//! puts every state back before any vCPU runs.
//!
//! The state file: a fixed header, then the state as JSON.
//!
//! ```text
//! offset  size  field
//!      0     8  magic "VMMKSNAP"
//!      8     4  format version, little endian (this release writes 1)
//!     12     4  CRC-32 (IEEE) of the payload
//!     16     8  payload length in bytes (at most MAX_STATE_BYTES)
//!     24     n  payload: the state, serde JSON
//! ```
//!
//! The payload is self-describing: a later release adds fields with
//! defaults and still reads what this one wrote, which is what lets a
//! snapshot outlive the release that made it. A file is checked in this
//! order before anything is allocated for it or restored from it: magic,
//! version, declared length against the bound and against the file's size,
//! CRC, then the JSON against the state's type (unknown fields refused).
//!
//! ```
//! use vmm_core::snapshot::{decode, encode, StateFileError};
//!
//! let bytes = encode(&vec![1u32, 2, 3])?;
//! assert_eq!(decode::<Vec<u32>>(&bytes)?, [1, 2, 3]);
//! let mut bad = bytes.clone();
//! *bad.last_mut().unwrap() ^= 1;
//! assert!(matches!(decode::<Vec<u32>>(&bad), Err(StateFileError::Crc { .. })));
//! # Ok::<(), StateFileError>(())
//! ```

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Serialize;

mod state;

pub use state::{
    BadSnapshot, DiskDescription, MachineDescription, MemoryDescription, NetDescription,
    SnapshotKind, SnapshotState, VirtioDeviceSnapshot, VsockDescription, MAX_MEMORY_LAYERS,
    MAX_SNAPSHOT_DEVICES,
};

/// What to write when taking a snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotRequest {
    /// The state file (replaced whole, or left as it was on failure).
    pub state_path: std::path::PathBuf,
    /// The memory file (replaced whole, or left as it was on failure).
    pub memory_path: std::path::PathBuf,
    /// Full, or the pages written since the last snapshot or restore (the
    /// VM must track dirty pages: [`VmConfig::track_dirty_pages`](crate::VmConfig::track_dirty_pages)).
    pub kind: SnapshotKind,
}

/// What taking a snapshot did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// Bytes of guest memory written to the memory file.
    pub memory_bytes: u64,
    /// Memory files a restore of this snapshot needs.
    pub layers: u32,
    /// How long it took, from the request to both files being durable.
    pub duration: std::time::Duration,
}

/// Where a VM is restored from, and what changes for this copy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RestoreConfig {
    /// The state file.
    pub state_path: std::path::PathBuf,
    /// The memory files: a full snapshot's, then each diff layered over it
    /// in the order they were taken; or one file holding them all merged
    /// ([`vmm_memory::snapshot::merge_layer`]).
    pub memory: Vec<std::path::PathBuf>,
    /// Copy memory in at once (into RAM backed as
    /// [`VmConfig::ram_backing`](crate::VmConfig::ram_backing) says) instead
    /// of mapping the file privately and reading pages as the guest touches
    /// them.
    pub eager: bool,
    /// Disk images to use instead of those the snapshot names, by disk id
    /// (name, else serial): each clone its own overlay. The image must have
    /// the saved size.
    pub disks: Vec<(String, std::path::PathBuf)>,
    /// TAP interfaces to use instead of those the snapshot names, by NIC id
    /// (Firecracker's `network_overrides`): each clone its own TAP.
    pub nets: Vec<(String, String)>,
    /// The Unix socket the vsock device listens on instead of the one the
    /// snapshot names (each clone its own; the saved one may still be in
    /// use by the VM that was saved).
    pub vsock_uds: Option<std::path::PathBuf>,
    /// Run the guest at once; otherwise the VM starts paused.
    pub resume: bool,
}

/// Why a snapshot could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The VM has not started, or has ended.
    #[error("the VM is not running")]
    NotRunning,
    /// Snapshots are taken of a paused VM only.
    #[error("the VM must be paused to take a snapshot")]
    NotPaused,
    /// A diff snapshot of a VM that does not track dirty pages.
    #[error("a diff snapshot needs dirty page tracking (track_dirty_pages), which this VM was started without")]
    NoDirtyTracking,
    /// A diff snapshot with nothing to layer over.
    #[error("a diff snapshot layers over a previous snapshot of this VM (or the one it was restored from): take a full snapshot first")]
    NoBase,
    /// A vCPU did not answer.
    #[error("vCPU {0} did not save its state in time")]
    VcpuTimeout(u8),
    /// A vCPU's state could not be read.
    #[error("vCPU {id}: cannot save its state")]
    Vcpu {
        /// The vCPU.
        id: u8,
        /// Why.
        #[source]
        source: crate::vcpu::VcpuError,
    },
    /// The VM's state could not be read.
    #[error("cannot save the VM's state")]
    Vm(#[from] crate::vm::VmError),
    /// A device lock was poisoned.
    #[error("the lock of {0} is poisoned")]
    Poisoned(&'static str),
    /// A disk could not be flushed.
    #[error("cannot flush a disk before the snapshot")]
    Flush(#[source] io::Error),
    /// The memory file could not be written.
    #[error("memory file {path}")]
    Memory {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: vmm_memory::snapshot::MemoryFileError,
    },
    /// The state file could not be written.
    #[error(transparent)]
    StateFile(#[from] StateFileError),
}

/// Why a snapshot could not be restored.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The state file is unusable.
    #[error(transparent)]
    StateFile(#[from] StateFileError),
    /// The state does not hold together.
    #[error(transparent)]
    Bad(#[from] BadSnapshot),
    /// Not as many memory files as the snapshot needs.
    #[error("the snapshot needs {needed} memory file(s) (a full one, then each diff in order), or one with them merged; {given} given")]
    Layers {
        /// Layers the snapshot needs.
        needed: u32,
        /// Files given.
        given: usize,
    },
    /// A memory file is unusable.
    #[error("memory file {path}")]
    Memory {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: vmm_memory::snapshot::MemoryFileError,
    },
    /// This host lacks CPU features the snapshot's vCPUs use.
    #[error("this host's KVM lacks CPU features the snapshot's guest uses: {0}")]
    CpuFeatures(String),
    /// This host has less memory than the guest.
    #[error(
        "the snapshot's guest has {guest_mib} MiB of RAM; this host has {host_mib} MiB in all"
    )]
    HostMemory {
        /// Guest RAM.
        guest_mib: u64,
        /// Host RAM.
        host_mib: u64,
    },
    /// A disk override names no disk of the snapshot.
    #[error("the snapshot has no disk with the id {0:?}")]
    NoSuchDisk(String),
    /// A network override names no NIC of the snapshot.
    #[error("the snapshot has no network interface with the id {0:?}")]
    NoSuchNet(String),
    /// A part of the machine is not what the state describes.
    #[error("{what}: the snapshot has {saved}, the VM being built has {here}")]
    Mismatch {
        /// What differs.
        what: String,
        /// The snapshot's.
        saved: String,
        /// The VM's.
        here: String,
    },
    /// A device refused its state.
    #[error("{device}: its saved state cannot be restored")]
    Device {
        /// Which device.
        device: String,
        /// Why.
        #[source]
        source: vmm_devices::persist::RestoreError,
    },
}

/// The first bytes of every state file.
pub const MAGIC: [u8; 8] = *b"VMMKSNAP";
/// The format version this release writes, and the newest it reads.
pub const FORMAT_VERSION: u32 = 1;
/// Header bytes before the payload.
pub const HEADER_BYTES: usize = 24;
/// The largest payload a state file may declare.
pub const MAX_STATE_BYTES: u64 = 64 << 20;

/// Why a state file could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum StateFileError {
    /// The file could not be created, written, opened or read.
    #[error("{what} {path}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: String,
        /// Why it failed.
        #[source]
        source: io::Error,
    },
    /// The file cannot be opened, or is not a regular file.
    #[error(transparent)]
    Open(vmm_devices::host_files::HostFileError),
    /// Shorter than a header.
    #[error("not a snapshot state file: {0} bytes, shorter than the {HEADER_BYTES}-byte header")]
    TooShort(usize),
    /// Another kind of file.
    #[error("not a snapshot state file: it starts with {0:02x?}, not \"VMMKSNAP\"")]
    NotAStateFile([u8; 8]),
    /// Written by a newer release.
    #[error("state format {found} is newer than this release reads (up to {FORMAT_VERSION}); restore it with a newer release")]
    NewerFormat {
        /// The file's format version.
        found: u32,
    },
    /// A declared length over the bound.
    #[error("the state declares {0} bytes; at most {MAX_STATE_BYTES} are accepted")]
    TooLarge(u64),
    /// The file is shorter or longer than it declares.
    #[error(
        "the state declares {declared} bytes but {actual} follow the header (truncated or padded)"
    )]
    Length {
        /// What the header says.
        declared: u64,
        /// What is there.
        actual: u64,
    },
    /// The content does not match its checksum.
    #[error("the state is corrupt: CRC {actual:#010x}, the header says {expected:#010x}")]
    Crc {
        /// What the header says.
        expected: u32,
        /// What the content gives.
        actual: u32,
    },
    /// The JSON is not the state this release expects.
    #[error("the state cannot be read: {0}")]
    Decode(#[source] serde_json::Error),
    /// The state could not be turned into JSON.
    #[error("the state cannot be written: {0}")]
    Encode(#[source] serde_json::Error),
}

/// The file's bytes for `state`.
pub fn encode<T: Serialize>(state: &T) -> Result<Vec<u8>, StateFileError> {
    let payload = serde_json::to_vec(state).map_err(StateFileError::Encode)?;
    let len = payload.len() as u64;
    if len > MAX_STATE_BYTES {
        return Err(StateFileError::TooLarge(len));
    }
    let mut out = Vec::with_capacity(HEADER_BYTES + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// What a header says: the payload's length and CRC.
fn check_header(head: &[u8]) -> Result<(u64, u32), StateFileError> {
    if head.len() < HEADER_BYTES {
        return Err(StateFileError::TooShort(head.len()));
    }
    let field = |at: usize| -> [u8; 4] { [head[at], head[at + 1], head[at + 2], head[at + 3]] };
    let mut magic = [0u8; 8];
    magic.copy_from_slice(&head[..8]);
    if magic != MAGIC {
        return Err(StateFileError::NotAStateFile(magic));
    }
    let version = u32::from_le_bytes(field(8));
    if version > FORMAT_VERSION || version == 0 {
        return Err(StateFileError::NewerFormat { found: version });
    }
    let crc = u32::from_le_bytes(field(12));
    let mut len = [0u8; 8];
    len.copy_from_slice(&head[16..24]);
    let len = u64::from_le_bytes(len);
    if len > MAX_STATE_BYTES {
        return Err(StateFileError::TooLarge(len));
    }
    Ok((len, crc))
}

/// The state in `bytes`, checked (see the [module documentation](self)).
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, StateFileError> {
    let (declared, expected) = check_header(bytes)?;
    let payload = &bytes[HEADER_BYTES..];
    if payload.len() as u64 != declared {
        return Err(StateFileError::Length {
            declared,
            actual: payload.len() as u64,
        });
    }
    let actual = crc32fast::hash(payload);
    if actual != expected {
        return Err(StateFileError::Crc { expected, actual });
    }
    serde_json::from_slice(payload).map_err(StateFileError::Decode)
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StateFileError + 'a {
    move |source| StateFileError::Io {
        what,
        path: path.display().to_string(),
        source,
    }
}

/// Writes `state` to a new file at `path`, durably: a file beside it is
/// written and synced, then renamed over `path` (an existing file is
/// replaced only by a whole new one).
pub fn write_state_file<T: Serialize>(path: &Path, state: &T) -> Result<(), StateFileError> {
    let bytes = encode(state)?;
    replace_atomically(path, |f: &mut File| {
        f.write_all(&bytes).map_err(io_err("cannot write", path))
    })
}

/// Makes `path` anew through a temporary sibling (mode 0600): `fill` writes
/// it, then it is synced, renamed over `path` and the directory synced. On
/// any failure the temporary is removed and `path` is left as it was.
pub fn replace_atomically<R, E: From<StateFileError>>(
    path: &Path,
    fill: impl FnOnce(&mut File) -> Result<R, E>,
) -> Result<R, E> {
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = Path::new(&tmp_name);
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(tmp)
        .map_err(io_err("cannot create", tmp))?;
    let result = fill(&mut f).and_then(|r| {
        f.sync_all().map_err(io_err("cannot sync", tmp))?;
        std::fs::rename(tmp, path).map_err(io_err("cannot rename to", path))?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(r)
    });
    if result.is_err() {
        let _ = std::fs::remove_file(tmp);
    }
    result
}

/// Reads and checks the state file at `path`: its header and size before
/// its content is read (a file that is not a regular file, or declares more
/// than it holds or more than the bound, is refused without reading it all).
pub fn read_state_file<T: DeserializeOwned>(path: &Path) -> Result<T, StateFileError> {
    let mut f = vmm_devices::host_files::open_input(
        "snapshot state file",
        path,
        vmm_devices::host_files::InputKind::RegularFile,
        false,
    )
    .map_err(StateFileError::Open)?;
    let size = f.metadata().map_err(io_err("cannot read", path))?.len();
    let mut head = [0u8; HEADER_BYTES];
    let got = read_up_to(&mut f, &mut head).map_err(io_err("cannot read", path))?;
    let (declared, _) = check_header(&head[..got])?;
    let actual = size - HEADER_BYTES as u64;
    if actual != declared {
        return Err(StateFileError::Length { declared, actual });
    }
    let mut bytes = head.to_vec();
    bytes.reserve(declared as usize);
    f.take(declared)
        .read_to_end(&mut bytes)
        .map_err(io_err("cannot read", path))?;
    decode(&bytes)
}

fn read_up_to(f: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match f.read(&mut buf[got..])? {
            0 => break,
            n => got += n,
        }
    }
    Ok(got)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct V1 {
        a: u32,
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct V2 {
        a: u32,
        #[serde(default)]
        b: Option<String>,
    }

    #[test]
    fn a_later_state_with_a_new_field_reads_an_older_file() {
        let old = encode(&V1 { a: 7 }).unwrap();
        assert_eq!(decode::<V2>(&old).unwrap(), V2 { a: 7, b: None });
    }

    #[test]
    fn every_damage_is_named() {
        let good = encode(&V1 { a: 7 }).unwrap();
        assert!(matches!(
            decode::<V1>(&good[..10]),
            Err(StateFileError::TooShort(10))
        ));
        let mut foreign = good.clone();
        foreign[..4].copy_from_slice(b"\x7fELF");
        assert!(matches!(
            decode::<V1>(&foreign),
            Err(StateFileError::NotAStateFile(_))
        ));
        let mut newer = good.clone();
        newer[8] = 2;
        assert!(matches!(
            decode::<V1>(&newer),
            Err(StateFileError::NewerFormat { found: 2 })
        ));
        let mut huge = good.clone();
        huge[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            decode::<V1>(&huge),
            Err(StateFileError::TooLarge(_))
        ));
        assert!(matches!(
            decode::<V1>(&good[..good.len() - 1]),
            Err(StateFileError::Length { .. })
        ));
        for i in HEADER_BYTES..good.len() {
            let mut flipped = good.clone();
            flipped[i] ^= 0x20;
            assert!(
                matches!(decode::<V1>(&flipped), Err(StateFileError::Crc { .. })),
                "byte {i}"
            );
        }
        let other = encode(&"not a V1").unwrap();
        assert!(matches!(
            decode::<V1>(&other),
            Err(StateFileError::Decode(_))
        ));
    }

    #[test]
    fn files_round_trip_and_are_checked_before_reading() {
        let dir = std::env::temp_dir().join(format!("vmm-core-state-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("vm.state");
        write_state_file(&p, &V1 { a: 9 }).unwrap();
        write_state_file(&p, &V1 { a: 10 }).unwrap();
        assert_eq!(read_state_file::<V1>(&p).unwrap(), V1 { a: 10 });
        let mut bytes = std::fs::read(&p).unwrap();
        bytes.push(b' ');
        std::fs::write(&p, &bytes).unwrap();
        assert!(matches!(
            read_state_file::<V1>(&p),
            Err(StateFileError::Length { .. })
        ));
        assert!(matches!(
            read_state_file::<V1>(&dir),
            Err(StateFileError::Open(_))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

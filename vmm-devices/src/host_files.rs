//! Host files a VM reads and writes, opened so that nothing blocks and
//! nothing is lost: an input is opened without blocking (a FIFO or a device
//! node cannot hang the VMM) and checked for what it must be; an output is
//! opened without truncation, compared by identity (device and inode) with
//! every input, and only then truncated if asked; disk images are locked with
//! OFD locks, as QEMU does, so that two VMMs cannot write the same image.
//! A Unix socket to listen on replaces only a socket nobody serves.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

/// What an input must be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InputKind {
    /// A regular file (a kernel, an initrd).
    RegularFile,
    /// A regular file or a block device (a disk image).
    FileOrBlockDevice,
}

/// How an output file is opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputMode {
    /// Created if missing, emptied if not.
    Truncate,
    /// Created if missing, written at its end.
    Append,
}

/// A file's identity: the device and inode it lives on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FileId {
    dev: u64,
    ino: u64,
}

impl FileId {
    /// The identity of an open file.
    pub fn of(file: &File) -> io::Result<Self> {
        let m = file.metadata()?;
        Ok(Self {
            dev: m.dev(),
            ino: m.ino(),
        })
    }
}

/// Why a host file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum HostFileError {
    /// The file could not be opened or inspected.
    #[error("cannot open {what} {path}")]
    Open {
        /// What it was for ("kernel", "disk image", ...).
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// It is not what it must be.
    #[error("{what} {path} is {found}, not {expected}")]
    WrongKind {
        /// What it was for.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// What it is.
        found: &'static str,
        /// What it must be.
        expected: &'static str,
    },
    /// An output is one of the inputs.
    #[error(
        "{what} {path} is the same file as the {input} {input_path}; refusing to overwrite it"
    )]
    OutputIsInput {
        /// What the output is for.
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// What the input is for.
        input: &'static str,
        /// The input's path.
        input_path: PathBuf,
    },
    /// The same image is given twice, not both read-only.
    #[error(
        "disk image {path} is given twice ({other_path}); only read-only disks may share an image"
    )]
    SameImageTwice {
        /// One path.
        path: PathBuf,
        /// The other.
        other_path: PathBuf,
    },
    /// Another process holds a conflicting lock on the image.
    #[error("disk image {path} is in use {holder}; add ,nolock to the disk to share it anyway (risking its data)")]
    Locked {
        /// The image.
        path: PathBuf,
        /// Who holds it, as far as it can be told.
        holder: String,
    },
    /// Another process listens on the socket.
    #[error("{what} {path} is in use: another process listens on it")]
    SocketInUse {
        /// What the socket is for.
        what: &'static str,
        /// The path.
        path: PathBuf,
    },
    /// The socket could not be made.
    #[error("cannot listen on {what} {path}")]
    Listen {
        /// What the socket is for.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The lock could not be taken for another reason.
    #[error("cannot lock disk image {path}")]
    Lock {
        /// The image.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

fn kind_name(ft: std::fs::FileType) -> &'static str {
    if ft.is_dir() {
        "a directory"
    } else if ft.is_fifo() {
        "a FIFO"
    } else if ft.is_socket() {
        "a socket"
    } else if ft.is_char_device() {
        "a character device"
    } else if ft.is_block_device() {
        "a block device"
    } else if ft.is_symlink() {
        "a symbolic link"
    } else {
        "a regular file"
    }
}

/// Opens `path` as an input (read-only, or read-write when `write`) without
/// blocking, and checks it is `kind` before any read.
pub fn open_input(
    what: &'static str,
    path: &Path,
    kind: InputKind,
    write: bool,
) -> Result<File, HostFileError> {
    let open_err = |source| HostFileError::Open {
        what,
        path: path.to_path_buf(),
        source,
    };
    // O_NONBLOCK: opening a FIFO waits for its other end otherwise, and a
    // device node may block; O_NOCTTY: a terminal never becomes ours.
    let expected = match kind {
        InputKind::RegularFile => "a regular file",
        InputKind::FileOrBlockDevice => "a regular file or a block device",
    };
    let file = match OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.raw_os_error() == Some(libc::EISDIR) => {
            return Err(HostFileError::WrongKind {
                what,
                path: path.to_path_buf(),
                found: "a directory",
                expected,
            })
        }
        Err(e) => return Err(open_err(e)),
    };
    let ft = file.metadata().map_err(open_err)?.file_type();
    let ok = match kind {
        InputKind::RegularFile => ft.is_file(),
        InputKind::FileOrBlockDevice => ft.is_file() || ft.is_block_device(),
    };
    if !ok {
        return Err(HostFileError::WrongKind {
            what,
            path: path.to_path_buf(),
            found: kind_name(ft),
            expected,
        });
    }
    set_blocking(&file).map_err(open_err)?;
    Ok(file)
}

fn set_blocking(file: &File) -> io::Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: fcntl on a descriptor this function's caller owns; no memory
    // is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// An input already open, for the identity checks of outputs.
#[derive(Clone, Debug)]
pub struct OpenedInput {
    /// What it is for.
    pub what: &'static str,
    /// Its path.
    pub path: PathBuf,
    /// Its identity.
    pub id: FileId,
}

/// Opens `path` as an output: created if missing, never truncated before it
/// is known not to be one of `inputs` (compared by device and inode, so a
/// symbolic or hard link to an input is caught too). It must be a regular
/// file or a character device (`/dev/null`, a terminal); a FIFO is opened
/// without blocking and refused.
pub fn open_output(
    what: &'static str,
    path: &Path,
    mode: OutputMode,
    inputs: &[OpenedInput],
) -> Result<File, HostFileError> {
    let open_err = |source| HostFileError::Open {
        what,
        path: path.to_path_buf(),
        source,
    };
    let file = match OpenOptions::new()
        .write(true)
        .create(true)
        .append(mode == OutputMode::Append)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(path)
    {
        Ok(f) => f,
        // A FIFO with no reader (ENXIO) or a directory: say what it is.
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENXIO | libc::EISDIR)) => {
            return Err(match std::fs::metadata(path) {
                Ok(m) => HostFileError::WrongKind {
                    what,
                    path: path.to_path_buf(),
                    found: kind_name(m.file_type()),
                    expected: "a regular file or a character device",
                },
                Err(_) => open_err(e),
            })
        }
        Err(e) => return Err(open_err(e)),
    };
    let meta = file.metadata().map_err(open_err)?;
    let ft = meta.file_type();
    if !(ft.is_file() || ft.is_char_device()) {
        return Err(HostFileError::WrongKind {
            what,
            path: path.to_path_buf(),
            found: kind_name(ft),
            expected: "a regular file or a character device",
        });
    }
    let id = FileId {
        dev: meta.dev(),
        ino: meta.ino(),
    };
    if let Some(input) = inputs.iter().find(|i| i.id == id) {
        return Err(HostFileError::OutputIsInput {
            what,
            path: path.to_path_buf(),
            input: input.what,
            input_path: input.path.clone(),
        });
    }
    set_blocking(&file).map_err(open_err)?;
    if mode == OutputMode::Truncate && ft.is_file() {
        file.set_len(0).map_err(open_err)?;
    }
    Ok(file)
}

/// Locks a disk image for this open file description (an OFD lock, which
/// conflicts with every other open of the file, in this process or
/// another): shared when `read_only`, exclusive otherwise. The lock goes
/// with the file.
pub fn lock_image(file: &File, path: &Path, read_only: bool) -> Result<(), HostFileError> {
    let kind = if read_only {
        libc::F_RDLCK
    } else {
        libc::F_WRLCK
    };
    let mut fl = libc::flock {
        l_type: kind as i16,
        l_whence: libc::SEEK_SET as i16,
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    };
    // SAFETY: F_OFD_SETLK with a valid `flock` on a descriptor we own.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) } == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if !matches!(err.raw_os_error(), Some(libc::EAGAIN | libc::EACCES)) {
        return Err(HostFileError::Lock {
            path: path.to_path_buf(),
            source: err,
        });
    }
    // SAFETY: F_OFD_GETLK fills `fl` with a conflicting lock, if any.
    unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
    let how = if i32::from(fl.l_type) == libc::F_WRLCK {
        "read-write"
    } else {
        "read-only"
    };
    let holder = match FileId::of(file).ok().and_then(lock_holder) {
        Some(pid) => format!("{how} by process {pid}{}", process_name(pid)),
        None => format!("{how} by another process or another disk of this VM"),
    };
    Err(HostFileError::Locked {
        path: path.to_path_buf(),
        holder,
    })
}

/// The process that holds a lock on `id`. `/proc/locks` shows OFD locks
/// without a pid, but the holder's `/proc/PID/fdinfo/FD` lists the lock of
/// that open file: look there (where this process may read it).
fn lock_holder(id: FileId) -> Option<u32> {
    let me = std::process::id();
    let (major, minor) = (libc::major(id.dev), libc::minor(id.dev));
    let wanted = format!("{major:02x}:{minor:02x}:{} ", id.ino);
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(entry.path().join("fdinfo")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(info) = std::fs::read_to_string(fd.path()) else {
                continue;
            };
            if info
                .lines()
                .any(|l| l.starts_with("lock:") && l.contains(&wanted))
            {
                return Some(pid);
            }
        }
    }
    None
}

fn process_name(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|c| format!(" ({})", c.trim()))
        .unwrap_or_default()
}

/// Listens on the Unix socket `path` (`what` names it in errors). A socket
/// left there by a process that is gone (connecting to it is refused) is
/// replaced; a live one, or anything that is not a socket, is refused and
/// left untouched.
///
/// ```
/// use vmm_devices::host_files::{listen_unix, HostFileError};
///
/// let dir = std::env::temp_dir().join(format!("listen-doc-{}", std::process::id()));
/// std::fs::create_dir_all(&dir)?;
/// let path = dir.join("api.sock");
/// let live = listen_unix("API socket", &path)?;
/// // A second listener on a live socket is refused.
/// assert!(matches!(
///     listen_unix("API socket", &path),
///     Err(HostFileError::SocketInUse { .. })
/// ));
/// drop(live); // The file stays, stale: the next listener replaces it.
/// let _again = listen_unix("API socket", &path)?;
/// # std::fs::remove_dir_all(&dir)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn listen_unix(what: &'static str, path: &Path) -> Result<UnixListener, HostFileError> {
    let listen_err = |source| HostFileError::Listen {
        what,
        path: path.to_path_buf(),
        source,
    };
    if check_socket_path(what, path)? {
        std::fs::remove_file(path).map_err(listen_err)?;
    }
    let listener = UnixListener::bind(path).map_err(listen_err)?;
    listener.set_nonblocking(true).map_err(listen_err)?;
    Ok(listener)
}

/// Checks that [`listen_unix`] may listen on `path`, without changing
/// anything: `Ok(false)` when nothing is there, `Ok(true)` when a stale
/// socket is (it would be replaced).
pub fn check_socket_path(what: &'static str, path: &Path) -> Result<bool, HostFileError> {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(false);
    };
    if !meta.file_type().is_socket() {
        return Err(HostFileError::WrongKind {
            what,
            path: path.to_path_buf(),
            found: kind_name(meta.file_type()),
            expected: "a socket (or nothing)",
        });
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(HostFileError::SocketInUse {
            what,
            path: path.to_path_buf(),
        }),
        // Nobody listens: a socket its process left behind.
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => Ok(true),
        Err(source) => Err(HostFileError::Listen {
            what,
            path: path.to_path_buf(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "vmm-host-files-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_fifo_input_is_refused_without_blocking() {
        let dir = temp_dir();
        let fifo = dir.join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo with a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let err = open_input("kernel", &fifo, InputKind::RegularFile, false).unwrap_err();
        assert!(
            err.to_string().contains("is a FIFO, not a regular file"),
            "{err}"
        );
        let err = open_output("console output", &fifo, OutputMode::Truncate, &[]).unwrap_err();
        assert!(
            matches!(
                err,
                HostFileError::WrongKind { .. } | HostFileError::Open { .. }
            ),
            "{err}"
        );
        for write in [false, true] {
            let err =
                open_input("disk image", &dir, InputKind::FileOrBlockDevice, write).unwrap_err();
            assert!(err.to_string().contains("is a directory"), "{err}");
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn an_output_that_is_an_input_is_refused_and_left_intact() {
        let dir = temp_dir();
        let disk = dir.join("disk.img");
        std::fs::write(&disk, b"precious").unwrap();
        let link = dir.join("link");
        std::os::unix::fs::symlink(&disk, &link).unwrap();
        let f = open_input("disk image", &disk, InputKind::FileOrBlockDevice, true).unwrap();
        let inputs = [OpenedInput {
            what: "disk image",
            path: disk.clone(),
            id: FileId::of(&f).unwrap(),
        }];
        for p in [&disk, &link] {
            let err = open_output("console output", p, OutputMode::Truncate, &inputs).unwrap_err();
            assert!(matches!(err, HostFileError::OutputIsInput { .. }), "{err}");
        }
        assert_eq!(std::fs::read(&disk).unwrap(), b"precious");
        let out = dir.join("out");
        std::fs::write(&out, b"old").unwrap();
        drop(open_output("console output", &out, OutputMode::Append, &inputs).unwrap());
        assert_eq!(std::fs::read(&out).unwrap(), b"old", "append keeps it");
        drop(open_output("console output", &out, OutputMode::Truncate, &inputs).unwrap());
        assert_eq!(std::fs::read(&out).unwrap(), b"", "truncate empties it");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn image_locks_are_shared_for_readers_and_exclusive_for_a_writer() {
        let dir = temp_dir();
        let img = dir.join("img");
        std::fs::write(&img, [0u8; 512]).unwrap();
        let open = |w| open_input("disk image", &img, InputKind::FileOrBlockDevice, w).unwrap();
        let (r1, r2) = (open(false), open(false));
        lock_image(&r1, &img, true).unwrap();
        lock_image(&r2, &img, true).unwrap();
        let w = open(true);
        let err = lock_image(&w, &img, false).unwrap_err();
        assert!(err.to_string().contains("in use read-only"), "{err}");
        drop((r1, r2));
        lock_image(&w, &img, false).unwrap();
        let r3 = open(false);
        let err = lock_image(&r3, &img, true).unwrap_err();
        assert!(err.to_string().contains("in use read-write"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}

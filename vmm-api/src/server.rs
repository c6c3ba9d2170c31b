//! The HTTP side: one thread, one `poll(2)` loop over a Unix socket and its
//! connections, every socket non-blocking. Requests are parsed with
//! `httparse`; heads and bodies are size bounded; a client that sends half a
//! request and stalls is dropped after [`REQUEST_TIMEOUT`]; one that does not
//! read its answers stops being read; connections beyond
//! [`MAX_CONNECTIONS`] push out the longest-idle one. Nothing a client does
//! blocks the loop, and the loop never touches the VM's threads except
//! through [`Api`].

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::api::Api;
use crate::model::ErrorBody;
use crate::request::{parse_request, ApiError};

/// Largest request head (request line and headers).
pub const MAX_HEAD: usize = 8 * 1024;
/// Largest request body (Firecracker's limit).
pub const MAX_BODY: usize = 51_200;
/// Headers a request may have.
pub const MAX_HEADERS: usize = 32;
/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 16;
/// How long a started request may take to arrive in full.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How often metrics are written when a destination is set (Firecracker's
/// period).
pub const METRICS_PERIOD: Duration = Duration::from_secs(60);
/// Answers a client may leave unread before it is no longer read from.
const MAX_PENDING_OUT: usize = 256 * 1024;

/// Why the API socket could not be served.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Something other than a socket is at the path.
    #[error("{0} exists and is not a socket; not replacing it")]
    NotASocket(PathBuf),
    /// Another process serves the socket.
    #[error("{0} is in use: another process listens on it")]
    InUse(PathBuf),
    /// The socket could not be made.
    #[error("cannot listen on {0}")]
    Bind(PathBuf, #[source] io::Error),
}

/// A bound, listening API socket.
pub struct ApiServer {
    listener: UnixListener,
    path: PathBuf,
}

impl ApiServer {
    /// Listens on `path`. A socket left there by a process that is gone is
    /// replaced; a live one, or anything that is not a socket, is refused.
    pub fn bind(path: &Path) -> Result<Self, ServerError> {
        use vmm_devices::host_files::{listen_unix, HostFileError};
        let listener = listen_unix("API socket", path).map_err(|e| match e {
            HostFileError::WrongKind { .. } => ServerError::NotASocket(path.to_path_buf()),
            HostFileError::SocketInUse { .. } => ServerError::InUse(path.to_path_buf()),
            HostFileError::Listen { source, .. } => ServerError::Bind(path.to_path_buf(), source),
            other => ServerError::Bind(path.to_path_buf(), io::Error::other(other)),
        })?;
        Ok(Self {
            listener,
            path: path.to_path_buf(),
        })
    }

    /// Serves a socket already listening at `path` (one made before the
    /// process confined itself, say).
    pub fn from_listener(listener: UnixListener, path: &Path) -> Result<Self, ServerError> {
        listener
            .set_nonblocking(true)
            .map_err(|e| ServerError::Bind(path.to_path_buf(), e))?;
        Ok(Self {
            listener,
            path: path.to_path_buf(),
        })
    }

    /// The listening socket.
    pub fn into_listener(self) -> UnixListener {
        self.listener
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves `api` until the process ends (the loop has no end of its own:
    /// the VMM's process ends with its VM).
    pub fn serve(self, mut api: Api) -> ! {
        let mut conns: Vec<Conn> = Vec::new();
        let mut next_metrics = Instant::now() + METRICS_PERIOD;
        loop {
            let now = Instant::now();
            let mut fds = Vec::with_capacity(conns.len() + 1);
            fds.push(libc::pollfd {
                fd: self.listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
            for c in &conns {
                let mut events = 0;
                if c.out.len() < MAX_PENDING_OUT && !c.closing {
                    events |= libc::POLLIN;
                }
                if !c.out.is_empty() {
                    events |= libc::POLLOUT;
                }
                fds.push(libc::pollfd {
                    fd: c.stream.as_raw_fd(),
                    events,
                    revents: 0,
                });
            }
            let mut wake = next_metrics;
            for c in &conns {
                if let Some(since) = c.started {
                    wake = wake.min(since + REQUEST_TIMEOUT);
                }
            }
            let timeout = wake.saturating_duration_since(now).as_millis().min(60_000) as i32;
            // SAFETY: `fds` is a valid array of `fds.len()` pollfd structs
            // that lives across the call.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
            if n < 0 {
                continue;
            }
            for (c, fd) in conns.iter_mut().zip(&fds[1..]) {
                if fd.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
                    c.read(&mut api);
                }
                if !c.out.is_empty() && fd.revents & (libc::POLLOUT | libc::POLLERR) != 0 {
                    c.write();
                }
            }
            if fds[0].revents & libc::POLLIN != 0 {
                self.accept(&mut conns);
            }
            let now = Instant::now();
            conns.retain(|c| {
                let timed_out = c.started.is_some_and(|s| now >= s + REQUEST_TIMEOUT);
                !(c.dead || (c.closing && c.out.is_empty()) || timed_out)
            });
            if now >= next_metrics {
                next_metrics = now + METRICS_PERIOD;
                if let Err(e) = api.flush_metrics() {
                    if !matches!(e, crate::metrics::MetricsError::NotInitialized) {
                        log::warn!("{e}");
                    }
                }
            }
        }
    }

    fn accept(&self, conns: &mut Vec<Conn>) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    if conns.len() >= MAX_CONNECTIONS {
                        // Push out the connection idle the longest.
                        if let Some(i) = conns
                            .iter()
                            .enumerate()
                            .filter(|(_, c)| c.started.is_none())
                            .min_by_key(|(_, c)| c.last_active)
                            .map(|(i, _)| i)
                        {
                            conns.remove(i);
                        } else {
                            continue;
                        }
                    }
                    conns.push(Conn::new(stream));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    }
}

struct Conn {
    stream: UnixStream,
    inbuf: Vec<u8>,
    out: Vec<u8>,
    /// When the request now arriving began, if one is partly here.
    started: Option<Instant>,
    last_active: Instant,
    continued: bool,
    closing: bool,
    dead: bool,
}

/// What the head of a connection's buffered bytes is ([`frame`]).
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    /// Not a whole request yet.
    Partial {
        /// The client waits for `100 Continue` before it sends the body.
        expect_continue: bool,
    },
    /// A whole request, `len` bytes long.
    Request {
        /// The method.
        method: String,
        /// The path (with any query string).
        path: String,
        /// The body.
        body: Vec<u8>,
        /// Bytes of the buffer it took.
        len: usize,
        /// The client asked to close the connection after the answer.
        close: bool,
    },
    /// A request that cannot be served: answer with this status and
    /// message, and close.
    Refused(u16, String),
}

/// Finds the first request in `buf` (HTTP/1.x, parsed by httparse): whole,
/// partial, or refused for its size or form.
///
/// ```
/// use vmm_api::server::{frame, Frame};
///
/// let f = frame(b"PUT /vm HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}GET / HTTP/1.1\r\n");
/// assert!(matches!(f, Frame::Request { len: 41, .. }));
/// assert!(matches!(frame(b"GET / HT"), Frame::Partial { .. }));
/// ```
pub fn frame(buf: &[u8]) -> Frame {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
            return Frame::Refused(431, format!("request head over {MAX_HEAD} bytes"))
        }
        Ok(httparse::Status::Partial) => {
            return Frame::Partial {
                expect_continue: false,
            }
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Frame::Refused(431, format!("more than {MAX_HEADERS} headers"))
        }
        Err(e) => return Frame::Refused(400, format!("malformed HTTP request: {e}")),
    };
    if head_len > MAX_HEAD {
        return Frame::Refused(431, format!("request head over {MAX_HEAD} bytes"));
    }
    let mut content_length = 0usize;
    let mut close = req.version == Some(0);
    let mut expect_continue = false;
    for h in req.headers.iter() {
        let value = String::from_utf8_lossy(h.value);
        let value = value.trim();
        if h.name.eq_ignore_ascii_case("content-length") {
            content_length = match value.parse() {
                Ok(n) => n,
                Err(_) => return Frame::Refused(400, format!("bad Content-Length {value:?}")),
            };
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Frame::Refused(
                501,
                "Transfer-Encoding is not supported; send Content-Length".into(),
            );
        } else if h.name.eq_ignore_ascii_case("connection") {
            close = value.eq_ignore_ascii_case("close");
        } else if h.name.eq_ignore_ascii_case("expect")
            && value.eq_ignore_ascii_case("100-continue")
        {
            expect_continue = true;
        }
    }
    if content_length > MAX_BODY {
        return Frame::Refused(
            413,
            format!("body of {content_length} bytes; at most {MAX_BODY}"),
        );
    }
    let total = head_len + content_length;
    if buf.len() < total {
        return Frame::Partial { expect_continue };
    }
    Frame::Request {
        method: req.method.unwrap_or("").to_string(),
        path: req.path.unwrap_or("").to_string(),
        body: buf[head_len..total].to_vec(),
        len: total,
        close,
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        _ => "Error",
    }
}

fn response(status: u16, body: Option<&str>, close: bool) -> Vec<u8> {
    let mut head = format!(
        "HTTP/1.1 {status} {}\r\nServer: {}\r\n",
        reason(status),
        crate::api::APP_NAME
    );
    if close {
        head.push_str("Connection: close\r\n");
    }
    match body {
        Some(b) => {
            head.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
                b.len()
            ));
        }
        None if status == 204 => head.push_str("\r\n"),
        None => head.push_str("Content-Length: 0\r\n\r\n"),
    }
    head.into_bytes()
}

fn error_response(e: &ApiError, close: bool) -> Vec<u8> {
    let body = serde_json::to_string(&ErrorBody {
        fault_message: e.to_string(),
    })
    .unwrap_or_default();
    response(e.status(), Some(&body), close)
}

impl Conn {
    fn new(stream: UnixStream) -> Self {
        Self {
            stream,
            inbuf: Vec::new(),
            out: Vec::new(),
            started: None,
            last_active: Instant::now(),
            continued: false,
            closing: false,
            dead: false,
        }
    }

    fn read(&mut self, api: &mut Api) {
        let mut chunk = [0u8; 4096];
        loop {
            if self.closing || self.inbuf.len() >= MAX_HEAD + MAX_BODY {
                break;
            }
            match self.stream.read(&mut chunk) {
                Ok(0) => {
                    // The client is done sending; answer what is whole, then
                    // close.
                    self.closing = true;
                    if self.inbuf.is_empty() {
                        self.dead = self.out.is_empty();
                    }
                    break;
                }
                Ok(n) => {
                    self.last_active = Instant::now();
                    self.started.get_or_insert(self.last_active);
                    self.inbuf.extend_from_slice(&chunk[..n]);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    self.dead = true;
                    return;
                }
            }
        }
        self.serve(api);
        if self.closing && self.out.is_empty() {
            self.dead = true;
        }
    }

    fn serve(&mut self, api: &mut Api) {
        while !self.inbuf.is_empty() {
            match frame(&self.inbuf) {
                Frame::Partial { expect_continue } => {
                    if expect_continue && !self.continued {
                        self.continued = true;
                        self.out.extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
                    }
                    break;
                }
                Frame::Refused(status, message) => {
                    let body = serde_json::to_string(&ErrorBody {
                        fault_message: message,
                    })
                    .unwrap_or_default();
                    self.out.extend(response(status, Some(&body), true));
                    self.inbuf.clear();
                    self.closing = true;
                }
                Frame::Request {
                    method,
                    path,
                    body,
                    len,
                    close,
                } => {
                    self.inbuf.drain(..len);
                    self.continued = false;
                    let answer = parse_request(&method, &path, &body).and_then(|r| api.handle(r));
                    let bytes = match answer {
                        Ok(Some(v)) => response(200, Some(&v.to_string()), close),
                        Ok(None) => response(204, None, close),
                        Err(e) => error_response(&e, close),
                    };
                    self.out.extend(bytes);
                    if close {
                        self.inbuf.clear();
                        self.closing = true;
                    }
                }
            }
        }
        self.started = (!self.inbuf.is_empty()).then(|| self.started.unwrap_or_else(Instant::now));
        self.write();
    }

    fn write(&mut self) {
        while !self.out.is_empty() {
            match self.stream.write(&self.out) {
                Ok(0) => {
                    self.dead = true;
                    return;
                }
                Ok(n) => {
                    self.out.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(_) => {
                    self.dead = true;
                    return;
                }
            }
        }
        if self.closing {
            self.dead = true;
        }
    }
}

/// The system calls the API thread makes, beyond those every VMM thread
/// may: accepting and polling its sockets, and kicking vCPUs out of the
/// guest to pause them.
pub const API_SYSCALLS: &[i64] = &[
    libc::SYS_tgkill,
    libc::SYS_accept4,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_getrandom,
];

/// The ioctls the API thread makes: making accepted sockets non-blocking.
pub const API_IOCTLS: &[u64] = &[libc::FIONBIO];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_and_bodies_are_bounded_and_checked() {
        assert!(matches!(
            frame(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
            Frame::Request {
                len: 27,
                close: false,
                ..
            }
        ));
        assert!(matches!(
            frame(b"GET / HTTP/1.0\r\n\r\n"),
            Frame::Request { close: true, .. }
        ));
        assert!(matches!(
            frame(b"PUT /vm HTTP/1.1\r\nContent-Length: 10\r\nExpect: 100-continue\r\n\r\n{}"),
            Frame::Partial {
                expect_continue: true
            }
        ));
        assert!(matches!(
            frame(b"PUT /vm HTTP/1.1\r\nContent-Length: 999999\r\n\r\n"),
            Frame::Refused(413, _)
        ));
        assert!(matches!(
            frame(b"PUT /vm HTTP/1.1\r\nContent-Length: -1\r\n\r\n"),
            Frame::Refused(400, _)
        ));
        assert!(matches!(
            frame(b"PUT /vm HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Frame::Refused(501, _)
        ));
        let long = format!("GET /{} HTTP/1.1\r\n", "a".repeat(MAX_HEAD));
        assert!(matches!(frame(long.as_bytes()), Frame::Refused(431, _)));
        assert!(matches!(
            frame(b"\x00\x01garbage\r\n\r\n"),
            Frame::Refused(400, _)
        ));
    }
}

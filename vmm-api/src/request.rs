//! From an HTTP method, path and body to a typed request: a pure function
//! (no I/O), so that every malformed request is a clear error and the parser
//! can be fuzzed on its own.
//!
//! ```
//! use vmm_api::request::{parse_request, ApiRequest};
//! use vmm_api::model::VmRunState;
//!
//! let req = parse_request("PATCH", "/vm", br#"{"state": "Paused"}"#).unwrap();
//! assert_eq!(req, ApiRequest::PatchVm(VmRunState::Paused));
//! let err = parse_request("PUT", "/machine-config", br#"{"vcpu_count": "two"}"#).unwrap_err();
//! assert_eq!(err.status(), 400);
//! ```

use serde::de::DeserializeOwned;

use crate::model::*;

/// A request of the API, checked for shape (not yet against the VM's state).
#[derive(Clone, Debug, PartialEq)]
pub enum ApiRequest {
    /// `GET /`.
    GetInstanceInfo,
    /// `GET /version`.
    GetVersion,
    /// `GET /machine-config`.
    GetMachineConfig,
    /// `PUT /machine-config`.
    PutMachineConfig(MachineConfig),
    /// `PATCH /machine-config`.
    PatchMachineConfig(MachineConfigUpdate),
    /// `PUT /boot-source`.
    PutBootSource(BootSource),
    /// `PUT /drives/{id}`.
    PutDrive(Drive),
    /// `PATCH /drives/{id}`.
    PatchDrive(PartialDrive),
    /// `PUT /entropy`.
    PutEntropy(EntropyDevice),
    /// `PUT /network-interfaces/{id}`.
    PutNetworkInterface(NetworkInterface),
    /// `PATCH /network-interfaces/{id}`.
    PatchNetworkInterface(PartialNetworkInterface),
    /// `PUT /vsock`.
    PutVsock(VsockDevice),
    /// `PUT /actions`.
    Action(ActionType),
    /// `PATCH /vm`.
    PatchVm(VmRunState),
    /// `GET /vm/config`.
    GetVmConfig,
    /// `PUT /logger`.
    PutLogger(LoggerConfig),
    /// `PUT /metrics`.
    PutMetrics(MetricsConfig),
    /// `PUT /snapshot/create`.
    CreateSnapshot(SnapshotCreateParams),
    /// `PUT /snapshot/load`.
    LoadSnapshot(SnapshotLoadParams),
}

/// Why a request was refused; every one is an HTTP status and a
/// `fault_message`.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No such resource, or not with this method.
    #[error("Invalid request method and/or path: {method} {path}.")]
    InvalidPathMethod {
        /// The method.
        method: String,
        /// The path.
        path: String,
    },
    /// A resource this VMM does not offer (yet).
    #[error("{0} is not supported by this VMM")]
    NotSupported(String),
    /// A body was needed.
    #[error("Empty {0} request.")]
    EmptyBody(&'static str),
    /// The body is not the resource's JSON.
    #[error("An error occurred when deserializing the json body of a request: {0}.")]
    Body(#[from] serde_json::Error),
    /// The id in the path and the body differ.
    #[error("The id from the path [{path}] does not match the id from the body [{body}]!")]
    IdMismatch {
        /// The id in the path.
        path: String,
        /// The id in the body.
        body: String,
    },
    /// A value is outside what this VMM accepts.
    #[error("{0}")]
    Invalid(String),
    /// The VM's lifecycle refused the request.
    #[error("{0}")]
    Lifecycle(String),
    /// Something failed on the host side.
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    /// The HTTP status: 400 for the client's requests, 500 for host
    /// failures.
    pub fn status(&self) -> u16 {
        match self {
            ApiError::Internal(_) => 500,
            _ => 400,
        }
    }
}

fn body<T: DeserializeOwned>(method: &'static str, bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::EmptyBody(method));
    }
    Ok(serde_json::from_slice(bytes)?)
}

/// Checks a path id: not empty, at most 64 characters of letters, digits
/// and `_` (Firecracker's rule).
fn check_id(id: &str) -> Result<(), ApiError> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(ApiError::Invalid(format!(
            "invalid id {id:?}: 1-64 characters of letters, digits and _"
        )))
    }
}

/// Parses one request. `path` may carry a query string (ignored).
pub fn parse_request(method: &str, path: &str, bytes: &[u8]) -> Result<ApiRequest, ApiError> {
    let clean = path.split(['?', '#']).next().unwrap_or("");
    let parts: Vec<&str> = clean
        .trim_start_matches('/')
        .trim_end_matches('/')
        .split('/')
        .collect();
    let invalid = || ApiError::InvalidPathMethod {
        method: method.to_string(),
        path: path.to_string(),
    };
    let parts: &[&str] = if parts == [""] { &[] } else { &parts };
    Ok(match (method, parts) {
        ("GET", []) => ApiRequest::GetInstanceInfo,
        ("GET", ["version"]) => ApiRequest::GetVersion,
        ("GET", ["machine-config"]) => ApiRequest::GetMachineConfig,
        ("PUT", ["machine-config"]) => ApiRequest::PutMachineConfig(body("PUT", bytes)?),
        ("PATCH", ["machine-config"]) => {
            let update: MachineConfigUpdate = body("PATCH", bytes)?;
            if update == MachineConfigUpdate::default() {
                return Err(ApiError::EmptyBody("PATCH"));
            }
            ApiRequest::PatchMachineConfig(update)
        }
        ("PUT", ["boot-source"]) => ApiRequest::PutBootSource(body("PUT", bytes)?),
        ("PUT", ["drives", id]) => {
            check_id(id)?;
            let drive: Drive = body("PUT", bytes)?;
            same_id(id, &drive.drive_id)?;
            ApiRequest::PutDrive(drive)
        }
        ("PATCH", ["drives", id]) => {
            check_id(id)?;
            let drive: PartialDrive = body("PATCH", bytes)?;
            same_id(id, &drive.drive_id)?;
            if drive.path_on_host.is_none() && drive.rate_limiter.is_none() {
                return Err(ApiError::Invalid(
                    "Please specify at least one property to patch: path_on_host, rate_limiter."
                        .into(),
                ));
            }
            ApiRequest::PatchDrive(drive)
        }
        ("PUT", ["entropy"]) => ApiRequest::PutEntropy(body("PUT", bytes)?),
        ("PUT", ["vsock"]) => ApiRequest::PutVsock(body("PUT", bytes)?),
        ("PUT", ["network-interfaces", id]) => {
            check_id(id)?;
            let nic: NetworkInterface = body("PUT", bytes)?;
            same_id(id, &nic.iface_id)?;
            ApiRequest::PutNetworkInterface(nic)
        }
        ("PATCH", ["network-interfaces", id]) => {
            check_id(id)?;
            let nic: PartialNetworkInterface = body("PATCH", bytes)?;
            same_id(id, &nic.iface_id)?;
            ApiRequest::PatchNetworkInterface(nic)
        }
        ("PUT", ["actions"]) => {
            let info: InstanceActionInfo = body("PUT", bytes)?;
            ApiRequest::Action(info.action_type)
        }
        ("PATCH", ["vm"]) => {
            let update: VmStateUpdate = body("PATCH", bytes)?;
            ApiRequest::PatchVm(update.state)
        }
        ("GET", ["vm", "config"]) => ApiRequest::GetVmConfig,
        ("PUT", ["logger"]) => ApiRequest::PutLogger(body("PUT", bytes)?),
        ("PUT", ["metrics"]) => ApiRequest::PutMetrics(body("PUT", bytes)?),
        ("PUT", ["snapshot", "create"]) => ApiRequest::CreateSnapshot(body("PUT", bytes)?),
        ("PUT", ["snapshot", "load"]) => {
            let load: SnapshotLoadParams = body("PUT", bytes)?;
            match (&load.mem_file_path, &load.mem_backend) {
                (Some(_), Some(_)) | (None, None) => {
                    return Err(ApiError::Invalid(
                        "Exactly one of mem_file_path and mem_backend must be given.".into(),
                    ))
                }
                _ => {}
            }
            if load.enable_diff_snapshots.is_some() && load.track_dirty_pages.is_some() {
                return Err(ApiError::Invalid(
                    "enable_diff_snapshots and track_dirty_pages cannot both be given (the first is the deprecated name of the second).".into(),
                ));
            }
            ApiRequest::LoadSnapshot(load)
        }
        (
            "GET" | "PUT" | "PATCH",
            ["balloon" | "mmds" | "cpu-config" | "pmem" | "hotplug" | "serial", ..],
        ) => {
            return Err(ApiError::NotSupported(format!(
                "{method} /{}",
                parts.join("/")
            )));
        }
        _ => return Err(invalid()),
    })
}

fn same_id(path: &str, body: &str) -> Result<(), ApiError> {
    if path == body {
        Ok(())
    } else {
        Err(ApiError::IdMismatch {
            path: path.to_string(),
            body: body.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_served_path_parses() {
        let ok = [
            ("GET", "/", ""),
            ("GET", "/version", ""),
            ("GET", "/machine-config", ""),
            (
                "PUT",
                "/machine-config",
                r#"{"vcpu_count": 2, "mem_size_mib": 256}"#,
            ),
            ("PATCH", "/machine-config", r#"{"vcpu_count": 2}"#),
            ("PUT", "/boot-source", r#"{"kernel_image_path": "/k"}"#),
            (
                "PUT",
                "/drives/root",
                r#"{"drive_id": "root", "is_root_device": true, "path_on_host": "/r"}"#,
            ),
            (
                "PATCH",
                "/drives/root",
                r#"{"drive_id": "root", "path_on_host": "/x"}"#,
            ),
            ("PUT", "/entropy", "{}"),
            ("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#),
            ("PATCH", "/vm", r#"{"state": "Resumed"}"#),
            ("GET", "/vm/config", ""),
            ("PUT", "/logger", r#"{"log_path": "/l", "level": "debug"}"#),
            ("PUT", "/metrics", r#"{"metrics_path": "/m"}"#),
            ("GET", "/version?x=1", ""),
        ];
        for (m, p, b) in ok {
            parse_request(m, p, b.as_bytes()).unwrap_or_else(|e| panic!("{m} {p}: {e}"));
        }
    }

    #[test]
    fn bad_requests_get_clear_messages() {
        let cases = [
            (
                "GET",
                "/nothing",
                "",
                "Invalid request method and/or path: GET /nothing.",
            ),
            ("DELETE", "/vm", "", "Invalid request method and/or path"),
            ("PUT", "/machine-config", "", "Empty PUT request."),
            (
                "PUT",
                "/machine-config",
                r#"{"vcpu_count": 1}"#,
                "missing field `mem_size_mib`",
            ),
            (
                "PUT",
                "/machine-config",
                r#"{"vcpu_count": 1, "mem_size_mib": 1, "x": 1}"#,
                "unknown field `x`",
            ),
            (
                "PUT",
                "/machine-config",
                r#"{"vcpu_count": -1, "mem_size_mib": 1}"#,
                "invalid value",
            ),
            (
                "PUT",
                "/drives/a",
                r#"{"drive_id": "b", "is_root_device": false}"#,
                "does not match",
            ),
            ("PUT", "/drives/a%20b", "{}", "invalid id"),
            ("PATCH", "/machine-config", "{}", "Empty PATCH request."),
            (
                "PATCH",
                "/drives/a",
                r#"{"drive_id": "a"}"#,
                "at least one property",
            ),
            (
                "PUT",
                "/actions",
                r#"{"action_type": "Reboot"}"#,
                "unknown variant `Reboot`",
            ),
            ("PATCH", "/vm", r#"{"state": "Stopped"}"#, "unknown variant"),
            (
                "PUT",
                "/network-interfaces/eth0",
                "{}",
                "missing field `iface_id`",
            ),
            (
                "PUT",
                "/network-interfaces/eth0",
                r#"{"iface_id": "eth1", "host_dev_name": "tap0"}"#,
                "eth1",
            ),
            (
                "PATCH",
                "/network-interfaces/eth0",
                r#"{"iface_id": "eth0", "rx_rate_limiter": {"bandwidth": {"size": 1}}}"#,
                "missing field `refill_time`",
            ),
            ("PUT", "/vsock", "{}", "missing field `guest_cid`"),
            // Firecracker has only PUT /vsock.
            ("PATCH", "/vsock", "{}", "Invalid request method"),
            ("GET", "/vsock", "", "Invalid request method"),
            ("PUT", "/vsock/v0", "{}", "Invalid request method"),
            ("PUT", "/snapshot/create", "{}", "missing field"),
            (
                "PUT",
                "/snapshot/load",
                r#"{"snapshot_path": "/s", "mem_file_path": "/m", "mem_backend": {"backend_type": "File", "backend_path": "/m"}}"#,
                "Exactly one",
            ),
            (
                "PUT",
                "/snapshot/load",
                r#"{"snapshot_path": "/s"}"#,
                "Exactly one",
            ),
            ("GET", "/snapshot/create", "", "Invalid request method"),
            (
                "PUT",
                "/logger",
                r#"{"log_path": "/l", "level": "loud"}"#,
                "unknown log level",
            ),
            ("PUT", "/boot-source", "[1, 2", "deserializing"),
        ];
        for (m, p, b, want) in cases {
            let e = parse_request(m, p, b.as_bytes()).expect_err(p);
            assert_eq!(e.status(), 400);
            assert!(e.to_string().contains(want), "{m} {p} {b}: {e}");
        }
    }
}

//! The management API's front door under any bytes a client can send: the
//! HTTP framing and then the request parser. Neither panics; a framed
//! request never claims more bytes than were sent nor a body over the
//! limit; refusals carry the statuses the server uses; every parsed request
//! is one of the served ones and every parse error is a client error.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmm_api::request::{parse_request, ApiRequest};
use vmm_api::server::{frame, Frame, MAX_BODY, MAX_HEAD};

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    // A client may pipeline requests: frame them one after another.
    for _ in 0..16 {
        match frame(rest) {
            Frame::Partial { .. } => {
                assert!(
                    rest.len() <= MAX_HEAD + MAX_BODY,
                    "partial at {} bytes",
                    rest.len()
                );
                break;
            }
            Frame::Refused(status, msg) => {
                assert!(matches!(status, 400 | 413 | 431 | 501), "{status}");
                assert!(!msg.is_empty());
                break;
            }
            Frame::Request {
                method,
                path,
                body,
                len,
                ..
            } => {
                assert!(
                    len > 0 && len <= rest.len(),
                    "claims {len} of {}",
                    rest.len()
                );
                assert!(body.len() <= MAX_BODY);
                match parse_request(&method, &path, &body) {
                    Ok(ApiRequest::PutMachineConfig(m)) => {
                        // What was accepted reads back the same.
                        let again: vmm_api::model::MachineConfig =
                            serde_json::from_value(serde_json::to_value(&m).expect("serialize"))
                                .expect("round trip");
                        assert_eq!(again, m);
                    }
                    Ok(_) => {}
                    Err(e) => {
                        assert_eq!(e.status(), 400);
                        assert!(!e.to_string().is_empty());
                    }
                }
                rest = &rest[len..];
            }
        }
    }
    // The parser alone, on the raw bytes as a body of each resource.
    for (method, path) in [
        ("PUT", "/machine-config"),
        ("PATCH", "/machine-config"),
        ("PUT", "/boot-source"),
        ("PUT", "/drives/rootfs"),
        ("PATCH", "/drives/rootfs"),
        ("PUT", "/actions"),
        ("PATCH", "/vm"),
        ("PUT", "/logger"),
        ("PUT", "/metrics"),
    ] {
        if let Err(e) = parse_request(method, path, data) {
            assert_eq!(e.status(), 400);
        }
    }
});

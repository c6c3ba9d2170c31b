//! Metrics in Firecracker's shape: one JSON object per flush, one line each,
//! counters reporting their increase since the previous flush.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};
use vmm_devices::metrics::{Counter, DeviceMetrics, MetricsRegistry};

/// Requests the API served or refused, by Firecracker's metric names.
#[derive(Debug, Default)]
pub struct ApiCounters {
    counts: Mutex<BTreeMap<(&'static str, &'static str), Counter>>,
}

impl ApiCounters {
    /// Counts one request in `group` (`get_api_requests`,
    /// `put_api_requests`, `patch_api_requests`) under `name`.
    pub fn count(&self, group: &'static str, name: &'static str) {
        if let Ok(mut c) = self.counts.lock() {
            c.entry((group, name)).or_default().inc();
        }
    }

    /// The total of one counter.
    pub fn get(&self, group: &'static str, name: &'static str) -> u64 {
        self.counts
            .lock()
            .ok()
            .and_then(|c| c.get(&(group, name)).map(Counter::get))
            .unwrap_or(0)
    }

    fn write_into(&self, out: &mut Map<String, Value>) {
        if let Ok(c) = self.counts.lock() {
            for ((group, name), counter) in c.iter() {
                let g = out
                    .entry(group.to_string())
                    .or_insert_with(|| Value::Object(Map::new()));
                if let Value::Object(g) = g {
                    g.insert(name.to_string(), json!(counter.take_delta()));
                }
            }
        }
    }
}

fn counters_json(counters: &[(&'static str, &Counter)]) -> Map<String, Value> {
    counters
        .iter()
        .map(|(name, c)| (name.to_string(), json!(c.take_delta())))
        .collect()
}

fn add_into(total: &mut Map<String, Value>, part: &Map<String, Value>) {
    for (k, v) in part {
        let sum = total.get(k).and_then(Value::as_u64).unwrap_or(0) + v.as_u64().unwrap_or(0);
        total.insert(k.clone(), json!(sum));
    }
}

/// One flush's object: the devices' counters (each block device under
/// `block_<id>` and all of them summed under `block`, each NIC under
/// `net_<id>` and summed under `net`), the API's, and the
/// time.
pub fn snapshot(devices: Option<&MetricsRegistry>, api: &ApiCounters) -> Value {
    let mut out = Map::new();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    out.insert("utc_timestamp_ms".into(), json!(now));
    let mut block = Map::new();
    let mut net = Map::new();
    if let Some(registry) = devices {
        for (name, m) in registry.entries() {
            let fields = match &m {
                DeviceMetrics::Block(b) => {
                    let f = counters_json(&b.counters());
                    add_into(&mut block, &f);
                    f
                }
                DeviceMetrics::Net(n) => {
                    let f = counters_json(&n.counters());
                    add_into(&mut net, &f);
                    f
                }
                DeviceMetrics::Vsock(v) => counters_json(&v.counters()),
                DeviceMetrics::Entropy(e) => counters_json(&e.counters()),
                DeviceMetrics::Uart(u) => counters_json(&u.counters()),
                DeviceMetrics::Vcpu(v) => counters_json(&v.counters()),
            };
            out.insert(name, Value::Object(fields));
        }
    }
    if !block.is_empty() {
        out.insert("block".into(), Value::Object(block));
    }
    if !net.is_empty() {
        out.insert("net".into(), Value::Object(net));
    }
    api.write_into(&mut out);
    Value::Object(out)
}

/// Where metrics go, once `PUT /metrics` (or the config file) said.
#[derive(Clone, Debug, Default)]
pub struct MetricsSink {
    out: Arc<Mutex<Option<File>>>,
    flushes: Arc<AtomicU64>,
}

/// Why metrics could not be written.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// No destination was configured.
    #[error("the metrics system was not initialized (PUT /metrics first)")]
    NotInitialized,
    /// A destination is configured already.
    #[error("the metrics system is already initialized")]
    AlreadyInitialized,
    /// The destination refused the write (a full disk; a named pipe nobody
    /// reads is skipped instead).
    #[error("cannot write the metrics: {0}")]
    Write(#[source] std::io::Error),
}

impl MetricsSink {
    /// Sets the destination (once).
    pub fn init(&self, file: File) -> Result<(), MetricsError> {
        let mut out = self.out.lock().map_err(|_| MetricsError::NotInitialized)?;
        if out.is_some() {
            return Err(MetricsError::AlreadyInitialized);
        }
        *out = Some(file);
        Ok(())
    }

    /// Whether a destination is set.
    pub fn is_initialized(&self) -> bool {
        self.out.lock().map(|o| o.is_some()).unwrap_or(false)
    }

    /// How many flushes were written.
    pub fn flushes(&self) -> u64 {
        self.flushes.load(Ordering::Relaxed)
    }

    /// Writes one line. A named pipe without a reader (EAGAIN) loses this
    /// flush rather than stalling the caller.
    pub fn flush(
        &self,
        devices: Option<&MetricsRegistry>,
        api: &ApiCounters,
    ) -> Result<(), MetricsError> {
        let mut out = self.out.lock().map_err(|_| MetricsError::NotInitialized)?;
        let file = out.as_mut().ok_or(MetricsError::NotInitialized)?;
        let mut line = snapshot(devices, api).to_string();
        line.push('\n');
        match file.write_all(line.as_bytes()) {
            Ok(()) => {
                self.flushes.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(()),
            Err(e) => Err(MetricsError::Write(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_devices::metrics::BlockMetrics;

    #[test]
    fn counters_report_increments_and_blocks_are_summed() {
        let reg = MetricsRegistry::default();
        let a = Arc::new(BlockMetrics::default());
        let b = Arc::new(BlockMetrics::default());
        reg.register("block_a", DeviceMetrics::Block(a.clone()));
        reg.register("block_b", DeviceMetrics::Block(b.clone()));
        a.read_count.add(2);
        b.read_count.add(3);
        let api = ApiCounters::default();
        api.count("put_api_requests", "actions_count");
        let v = snapshot(Some(&reg), &api);
        assert_eq!(v["block_a"]["read_count"], 2);
        assert_eq!(v["block"]["read_count"], 5);
        assert_eq!(v["put_api_requests"]["actions_count"], 1);
        assert!(v["utc_timestamp_ms"].as_u64().unwrap() > 0);
        a.read_count.inc();
        let v = snapshot(Some(&reg), &api);
        assert_eq!(v["block_a"]["read_count"], 1);
        assert_eq!(v["block"]["read_count"], 1);
        assert_eq!(v["put_api_requests"]["actions_count"], 0);
    }
}

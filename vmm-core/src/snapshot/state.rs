//! What a snapshot holds besides guest memory: the machine description
//! needed to rebuild the VM, and the state of every part of it.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use vmm_devices::legacy::{I8042State, SerialSnapshot, VmGenerationState};
use vmm_devices::virtio::mmio::MmioTransportState;

use crate::devices::{DiskConfig, NetConfig, TapSource};
use crate::vcpu::VcpuState;
use crate::vm::VmState;
use vmm_devices::rate_limiter::RateLimiterConfig;
use vmm_devices::virtio::net::MacAddr;

/// Most virtio devices a snapshot may describe.
pub const MAX_SNAPSHOT_DEVICES: usize = 64;
/// Most memory layers (a base and diffs) a snapshot may need.
pub const MAX_MEMORY_LAYERS: u32 = 4096;

/// A disk as the machine description keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskDescription {
    /// The image the disk was on when the snapshot was taken.
    pub path: PathBuf,
    /// Whether it is read-only.
    pub read_only: bool,
    /// The id the guest reads.
    #[serde(default)]
    pub serial: Option<String>,
    /// The name a manager knows it by.
    #[serde(default)]
    pub name: Option<String>,
    /// Whether the image is locked.
    pub lock: bool,
    /// Its limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiterConfig>,
}

impl From<&DiskConfig> for DiskDescription {
    fn from(d: &DiskConfig) -> Self {
        Self {
            path: d.path.clone(),
            read_only: d.read_only,
            serial: d.serial.clone(),
            name: d.name.clone(),
            lock: d.lock,
            rate_limiter: d.rate_limiter,
        }
    }
}

impl DiskDescription {
    /// The disk's configuration, on `path`.
    pub fn config(&self, path: PathBuf) -> DiskConfig {
        DiskConfig {
            path,
            read_only: self.read_only,
            serial: self.serial.clone(),
            name: self.name.clone(),
            lock: self.lock,
            rate_limiter: self.rate_limiter,
        }
    }

    /// The id a restore's disk override names it by: its name, else its
    /// serial.
    pub fn id(&self) -> Option<&str> {
        self.name.as_deref().or(self.serial.as_deref())
    }
}

/// A NIC as the machine description keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetDescription {
    /// Its id.
    pub id: String,
    /// The TAP interface it was on (a TAP given by descriptor is recorded
    /// by its interface name); a restore can name another.
    pub host_dev_name: String,
    /// The MAC address offered.
    #[serde(default)]
    pub mac: Option<MacAddr>,
    /// Receive limits.
    #[serde(default)]
    pub rx_rate_limiter: Option<RateLimiterConfig>,
    /// Transmit limits.
    #[serde(default)]
    pub tx_rate_limiter: Option<RateLimiterConfig>,
}

impl From<&NetConfig> for NetDescription {
    fn from(n: &NetConfig) -> Self {
        let host_dev_name = match &n.tap {
            TapSource::Name(name) => name.clone(),
            TapSource::Fd(fd) => format!("fd:{fd}"),
        };
        Self {
            id: n.id.clone(),
            host_dev_name,
            mac: n.mac,
            rx_rate_limiter: n.rx_rate_limiter,
            tx_rate_limiter: n.tx_rate_limiter,
        }
    }
}

impl NetDescription {
    /// The NIC's configuration, on the TAP interface `tap`.
    pub fn config(&self, tap: String) -> NetConfig {
        NetConfig {
            id: self.id.clone(),
            tap: TapSource::Name(tap),
            mac: self.mac,
            rx_rate_limiter: self.rx_rate_limiter,
            tx_rate_limiter: self.tx_rate_limiter,
        }
    }
}

/// The vsock device as the machine description keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockDescription {
    /// The guest's context id.
    pub guest_cid: u64,
    /// The Unix socket host programs connected to.
    pub uds_path: PathBuf,
}

/// What the VM was built from, as far as a restore needs it to build the
/// same machine again (the guest's view: RAM, vCPUs, devices in order).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineDescription {
    /// Guest RAM in MiB.
    pub mem_mib: u64,
    /// vCPUs.
    pub vcpus: u8,
    /// The command line the guest booted with (device entries included).
    pub cmdline: String,
    /// The debug-exit port.
    pub exit_port: u16,
    /// Whether a debug console is on port 0xE9.
    pub debugcon: bool,
    /// The built-in disks, in the order they were added.
    pub disks: Vec<DiskDescription>,
    /// The built-in NICs, in order (after the disks).
    #[serde(default)]
    pub nets: Vec<NetDescription>,
    /// The built-in vsock device, if there is one (after the NICs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<VsockDescription>,
    /// Whether the built-in virtio-rng is there (after the vsock device).
    pub rng: bool,
    /// Whether the built-in virtio-console is there (after the rng).
    pub console: bool,
}

/// One virtio device: where it sits and its state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VirtioDeviceSnapshot {
    /// The virtio device type.
    pub device_type: u32,
    /// Its MMIO window's first address.
    pub mmio_base: u64,
    /// Its interrupt line.
    pub irq: u32,
    /// The transport and its queues.
    pub transport: MmioTransportState,
    /// The device's own state
    /// ([`VirtioDevice::save_device_state`](vmm_devices::virtio::VirtioDevice::save_device_state)).
    #[serde(default)]
    pub device: Option<serde_json::Value>,
}

/// Full or diff.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotKind {
    /// Every page of guest memory (all-zero pages as holes).
    #[default]
    Full,
    /// Only the pages written since the previous snapshot of this VM (or
    /// since its restore), to layer over that one's memory.
    Diff,
}

/// Guest memory as the snapshot saved it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryDescription {
    /// Guest RAM in bytes (the memory file's size).
    pub size_bytes: u64,
    /// Full or diff.
    pub kind: SnapshotKind,
    /// How many memory files a restore needs: 1 for a full snapshot; for a
    /// diff, one more than the snapshot it layers over.
    pub layers: u32,
}

/// The whole state of a VM: what [`write_state_file`](super::write_state_file)
/// stores and a restore reads back.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotState {
    /// The release that wrote it.
    pub writer: String,
    /// The machine to build.
    pub machine: MachineDescription,
    /// Guest memory.
    pub memory: MemoryDescription,
    /// The in-kernel irqchip, PIT and clock.
    pub vm: VmState,
    /// Every vCPU, in index order.
    pub vcpus: Vec<VcpuState>,
    /// Every virtio device, in the order they were added.
    pub virtio: Vec<VirtioDeviceSnapshot>,
    /// COM1.
    pub serial: SerialSnapshot,
    /// The i8042 and its keyboard.
    pub i8042: I8042State,
    /// The generation port.
    pub generation: VmGenerationState,
}

/// Why a snapshot's state does not describe a VM that can be restored.
#[derive(Debug, thiserror::Error)]
#[error("snapshot state: {what}: {why}")]
pub struct BadSnapshot {
    /// Which part.
    pub what: &'static str,
    /// Why.
    pub why: String,
}

fn bad(what: &'static str, why: impl Into<String>) -> BadSnapshot {
    BadSnapshot {
        what,
        why: why.into(),
    }
}

impl SnapshotState {
    /// Checks what holds the state together before anything is built from
    /// it: counts and bounds, one vCPU state per vCPU in index order, the
    /// memory size, the machine's own rules. Each part's state is checked
    /// again when it is restored.
    pub fn validate(&self) -> Result<(), BadSnapshot> {
        let m = &self.machine;
        if m.vcpus == 0 || m.vcpus > vmm_boot::acpi::MAX_VCPUS {
            return Err(bad("vCPU count", format!("{}", m.vcpus)));
        }
        if self.vcpus.len() != usize::from(m.vcpus) {
            return Err(bad(
                "vCPU states",
                format!("{} states for {} vCPUs", self.vcpus.len(), m.vcpus),
            ));
        }
        for (i, v) in self.vcpus.iter().enumerate() {
            v.validate(i as u8)
                .map_err(|e| bad("vCPU state", e.to_string()))?;
        }
        self.vm
            .validate()
            .map_err(|e| bad("VM state", e.to_string()))?;
        if m.mem_mib == 0 || m.mem_mib > crate::lifecycle::MAX_MEM_MIB {
            return Err(bad("guest RAM", format!("{} MiB", m.mem_mib)));
        }
        if self.memory.size_bytes != m.mem_mib << 20 {
            return Err(bad(
                "memory size",
                format!(
                    "{} bytes for {} MiB of guest RAM",
                    self.memory.size_bytes, m.mem_mib
                ),
            ));
        }
        let layers_ok = match self.memory.kind {
            SnapshotKind::Full => self.memory.layers == 1,
            SnapshotKind::Diff => (2..=MAX_MEMORY_LAYERS).contains(&self.memory.layers),
        };
        if !layers_ok {
            return Err(bad(
                "memory layers",
                format!(
                    "{} for a {:?} snapshot",
                    self.memory.layers, self.memory.kind
                ),
            ));
        }
        if self.virtio.len() > MAX_SNAPSHOT_DEVICES {
            return Err(bad(
                "virtio devices",
                format!("{}, at most {MAX_SNAPSHOT_DEVICES}", self.virtio.len()),
            ));
        }
        let built_in = m.disks.len() + usize::from(m.rng) + usize::from(m.console);
        if built_in > self.virtio.len() {
            return Err(bad(
                "virtio devices",
                format!(
                    "{} saved, fewer than the {built_in} built-in ones described",
                    self.virtio.len()
                ),
            ));
        }
        vmm_boot::check_cmdline(&m.cmdline).map_err(|e| bad("command line", e.to_string()))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The snapshot the first release wrote (kept under `tests/snapshots`).
    fn release_state() -> SnapshotState {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/snapshots/v0.1.0/vm.state");
        super::super::read_state_file(&path).unwrap()
    }

    #[test]
    fn a_real_state_holds_together_and_each_break_is_named() {
        let good = release_state();
        good.validate().unwrap();
        let refused = |what: &str, f: &dyn Fn(&mut SnapshotState)| {
            let mut s = good.clone();
            f(&mut s);
            let err = s.validate().expect_err(what);
            assert_eq!(err.what, what, "{err}");
        };
        refused("vCPU states", &|s| {
            s.vcpus.pop();
        });
        refused("vCPU count", &|s| s.machine.vcpus = 0);
        refused("vCPU state", &|s| s.vcpus.swap(0, 1));
        refused("memory size", &|s| s.memory.size_bytes += 4096);
        refused("memory layers", &|s| s.memory.layers = 2);
        refused("memory layers", &|s| {
            s.memory.kind = SnapshotKind::Diff;
            s.memory.layers = 1;
        });
        refused("virtio devices", &|s| {
            let d = s.virtio[0].clone();
            s.virtio.resize(MAX_SNAPSHOT_DEVICES + 1, d);
        });
        refused("virtio devices", &|s| s.machine.rng = true);
        refused("command line", &|s| s.machine.cmdline.push('\n'));
        refused("VM state", &|s| s.vm.ioapic.chip_id = 0);
    }
}

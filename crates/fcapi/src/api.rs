//! Firecracker's API requests and their answers, without HTTP: [`Api::handle`] takes a
//! method, a path and a body and gives a status and a body, by Firecracker's rules (its
//! `parsed_request.rs` and `rpc_interface.rs`): configuration before InstanceStart, a few
//! changes after it, errors as `{"fault_message": ...}` with Firecracker's wording.
//!
//! What a running VM is asked goes through [`Instance`] (the VMM behind it is rhyve's).

use serde::de::DeserializeOwned;
use serde_json::{json, Value};

use crate::model::*;

/// The Firecracker release whose API (swagger) this follows, as `GET /version` says.
pub const FIRECRACKER_VERSION: &str = "1.16.1";
/// `GET /`'s app_name.
pub const APP_NAME: &str = "Firecracker";

/// An answer: a status and maybe a JSON body.
#[derive(Debug, Clone, PartialEq)]
pub struct Response {
    pub status: u16,
    pub body: Option<Value>,
}

impl Response {
    pub fn no_content() -> Self {
        Response {
            status: 204,
            body: None,
        }
    }

    pub fn ok(body: Value) -> Self {
        Response {
            status: 200,
            body: Some(body),
        }
    }

    pub fn fault(status: u16, msg: impl Into<String>) -> Self {
        Response {
            status,
            body: Some(json!({ "fault_message": msg.into() })),
        }
    }

    pub fn bad_request(msg: impl Into<String>) -> Self {
        Self::fault(400, msg)
    }
}

/// A started VM, as the API acts on it.
pub trait Instance: Send {
    fn pause(&self) -> Result<(), String>;
    fn resume(&self) -> Result<(), String>;
    fn is_paused(&self) -> bool;
    /// Presses Ctrl-Alt-Del on the i8042 keyboard.
    fn send_ctrl_alt_del(&self) -> Result<(), String>;
    /// The counters a metrics line carries.
    fn metrics(&self) -> Value;
    /// `PATCH /drives/{id}`: the drive's slot and the new backing file and/or limits.
    fn update_drive(
        &self,
        index: usize,
        path: Option<&str>,
        rate: Option<&RateLimiter>,
    ) -> Result<(), String>;
    /// `PATCH /network-interfaces/{id}`: the interface's place among the devices (after the
    /// drives) and its new limits.
    fn update_network(
        &self,
        index: usize,
        rx: Option<&RateLimiter>,
        tx: Option<&RateLimiter>,
    ) -> Result<(), String>;
    /// `PUT /snapshot/create` of the paused VM: the state file (with `resources`, what
    /// a load rebuilds the machine from) and the memory file.
    fn create_snapshot(
        &self,
        state: &std::path::Path,
        memory: &std::path::Path,
        resources: Vec<u8>,
    ) -> Result<(), String>;
}

/// The snapshot a `PUT /snapshot/load` starts the machine from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RestoreFrom {
    pub state: std::path::PathBuf,
    pub memory: std::path::PathBuf,
    /// `resume_vm`: run at once (else the VM waits paused for `PATCH /vm`).
    pub resume: bool,
}

/// The section of a snapshot's state file that holds the API's resources (JSON).
pub const RESOURCES_SECTION: &str = "fcapi.resources";

/// Builds and starts the machine (InstanceStart, or a snapshot load); its error is the
/// fault message.
pub type Starter = Box<
    dyn FnMut(&str, &VmResources, Option<&RestoreFrom>) -> Result<Box<dyn Instance>, String> + Send,
>;

/// Effects outside the VM: the logger and the metrics file.
pub trait Host: Send {
    fn configure_logger(&mut self, l: &Logger) -> Result<(), String>;
    fn configure_metrics(&mut self, m: &Metrics) -> Result<(), String>;
    /// Writes one metrics line (FlushMetrics).
    fn flush_metrics(&mut self, metrics: Value) -> Result<(), String>;
}

const NOT_ALLOWED_PRE_BOOT: &str =
    "The requested operation is not supported before starting the microVM.";
const NOT_ALLOWED_POST_BOOT: &str =
    "The requested operation is not supported after starting the microVM.";

/// The API's state: the resources, and the instance once started.
pub struct Api {
    id: String,
    resources: VmResources,
    /// The metrics can be set once, as Firecracker's.
    metrics_set: bool,
    starter: Starter,
    host: Box<dyn Host>,
    instance: Option<Box<dyn Instance>>,
}

fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, Response> {
    serde_json::from_slice(body).map_err(|e| {
        Response::bad_request(format!(
            "An error occurred when deserializing the json body of a request: {e}."
        ))
    })
}

/// The id in a path like `/drives/{id}`, checked as Firecracker's `checked_id` does (before
/// the body is read).
fn checked_id(id: Option<&str>) -> Result<&str, Response> {
    let id = id.unwrap_or("");
    if id.is_empty() {
        return Err(Response::bad_request("The ID cannot be empty."));
    }
    if !id.chars().all(|c| c.is_alphanumeric() || c == '_') {
        return Err(Response::bad_request(
            "API Resource IDs can only contain alphanumeric characters and underscores.",
        ));
    }
    Ok(id)
}

/// A VMM error of one of Firecracker's kinds: `"{prefix}: {msg}"`.
fn vmm_error(prefix: &str, msg: impl std::fmt::Display) -> Response {
    Response::bad_request(format!("{prefix}: {msg}"))
}

impl Api {
    pub fn new(id: &str, resources: VmResources, starter: Starter, host: Box<dyn Host>) -> Self {
        Api {
            id: id.to_string(),
            // A configuration file's metrics were opened by the caller.
            metrics_set: resources.metrics.is_some(),
            resources,
            starter,
            host,
            instance: None,
        }
    }

    pub fn started(&self) -> bool {
        self.instance.is_some()
    }

    /// The answer to one request.
    pub fn handle(&mut self, method: &str, path: &str, body: &[u8]) -> Response {
        match self.route(method, path, body) {
            Ok(r) | Err(r) => r,
        }
    }

    fn route(&mut self, method: &str, path: &str, body: &[u8]) -> Result<Response, Response> {
        // Firecracker's tokens: the first picks the resource, the second is an id or an
        // operation, and further ones are ignored.
        let mut tokens = path.trim_start_matches('/').split_terminator('/');
        let first = tokens.next().unwrap_or("");
        let second = tokens.next();
        match method {
            "GET" if !body.is_empty() => {
                return Err(Response::bad_request("GET request cannot have a body."))
            }
            "PUT" if body.is_empty() => return Err(Response::bad_request("Empty PUT request.")),
            "PATCH" if body.is_empty() => {
                return Err(Response::bad_request("Empty PATCH request."))
            }
            _ => {}
        }
        match (method, first) {
            ("GET", "") => Ok(Response::ok(self.instance_info())),
            ("GET", "version") => Ok(Response::ok(
                json!({ "firecracker_version": FIRECRACKER_VERSION }),
            )),
            ("GET", "machine-config") => Ok(Response::ok(
                serde_json::to_value(&self.resources.machine_config).unwrap_or(Value::Null),
            )),
            ("GET", "vm") if second == Some("config") => Ok(Response::ok(self.full_config())),
            ("PUT", "machine-config") => {
                let mut mc: MachineConfig = parse(body)?;
                self.pre_boot()?;
                // Absent, the template stays; "None" clears it.
                match mc.cpu_template.as_deref() {
                    None => mc.cpu_template = self.resources.machine_config.cpu_template.clone(),
                    Some("None") => mc.cpu_template = None,
                    Some(_) => {}
                }
                validate_machine_config(&mc)?;
                self.resources.machine_config = mc;
                Ok(Response::no_content())
            }
            ("PATCH", "machine-config") => {
                let u: MachineConfigUpdate = parse(body)?;
                self.pre_boot()?;
                self.patch_machine_config(u)?;
                Ok(Response::no_content())
            }
            ("PUT", "boot-source") => {
                let b: BootSource = parse(body)?;
                self.pre_boot()?;
                check_boot_source(&b)?;
                self.resources.boot_source = Some(b);
                Ok(Response::no_content())
            }
            ("PUT", "drives") => {
                let id = checked_id(second)?;
                let d: Drive = parse(body)?;
                drive_id_matches(id, &d.drive_id)?;
                self.pre_boot()?;
                self.put_drive(d)?;
                Ok(Response::no_content())
            }
            ("PATCH", "drives") => {
                let id = checked_id(second)?;
                let u: DriveUpdate = parse(body)?;
                drive_id_matches(id, &u.drive_id)?;
                self.post_boot()?;
                self.patch_drive(u)?;
                Ok(Response::no_content())
            }
            ("PUT", "network-interfaces") => {
                let id = checked_id(second)?;
                let n: NetworkInterface = parse(body)?;
                id_matches(id, &n.iface_id)?;
                self.pre_boot()?;
                self.put_network(n)?;
                Ok(Response::no_content())
            }
            ("PATCH", "network-interfaces") => {
                let id = checked_id(second)?;
                let u: NetworkInterfaceUpdate = parse(body)?;
                id_matches(id, &u.iface_id)?;
                self.post_boot()?;
                self.patch_network(u)?;
                Ok(Response::no_content())
            }
            ("PUT", "vsock") => {
                let v: Vsock = parse(body)?;
                self.pre_boot()?;
                self.put_vsock(&v)?;
                self.resources.vsock = Some(v);
                Ok(Response::no_content())
            }
            ("PUT", "logger") => {
                let l: Logger = parse(body)?;
                self.pre_boot()?;
                self.host
                    .configure_logger(&l)
                    .map_err(|e| vmm_error("Logger error", e))?;
                self.resources.logger = Some(l);
                Ok(Response::no_content())
            }
            ("PUT", "metrics") => {
                let m: Metrics = parse(body)?;
                self.pre_boot()?;
                let bad_input =
                    "Metrics error: Cannot initialize the metrics system due to bad user input";
                if self.metrics_set {
                    return Err(vmm_error(
                        bad_input,
                        "Reinitialization of metrics not allowed.",
                    ));
                }
                self.host
                    .configure_metrics(&m)
                    .map_err(|e| vmm_error(bad_input, e))?;
                self.metrics_set = true;
                self.resources.metrics = Some(m);
                Ok(Response::no_content())
            }
            ("PUT", "entropy") => {
                let e: Entropy = parse(body)?;
                self.pre_boot()?;
                self.check_room(self.resources.entropy.is_none())
                    .map_err(|m| {
                        vmm_error("Entropy config error: Could not create Entropy device", m)
                    })?;
                self.resources.entropy = Some(e);
                Ok(Response::no_content())
            }
            ("PUT", "actions") => {
                let a: Action = parse(body)?;
                self.action(a.action_type)
            }
            ("PATCH", "vm") => {
                let u: VmUpdate = parse(body)?;
                self.post_boot()?;
                let instance = self.instance.as_ref().ok_or_else(not_started)?;
                match u.state {
                    VmStateRequest::Paused => instance.pause(),
                    VmStateRequest::Resumed => instance.resume(),
                }
                .map_err(|e| vmm_error("Internal VMM error", e))?;
                Ok(Response::no_content())
            }
            ("PUT", "snapshot") => match second {
                None => Err(Response::bad_request("Missing snapshot operation type.")),
                Some("create") => {
                    let p: SnapshotCreateParams = parse(body)?;
                    self.post_boot()?;
                    self.create_snapshot(&p)
                }
                Some("load") => {
                    let p: SnapshotLoadParams = parse(body)?;
                    self.pre_boot()?;
                    self.load_snapshot(p)
                }
                Some(op) => Err(Response::bad_request(format!(
                    "Invalid request method and/or path: PUT /snapshot/{op}."
                ))),
            },
            (
                "GET" | "PUT" | "PATCH",
                "mmds" | "balloon" | "cpu-config" | "serial" | "pmem" | "hotplug",
            ) => Err(Response::bad_request(format!(
                "The requested operation is not supported: /{first} is not available in rhyve."
            ))),
            _ => Err(Response::bad_request(format!(
                "Invalid request method and/or path: {method} {first}."
            ))),
        }
    }

    /// `GET /vm/config`: every key Firecracker shows, those rhyve lacks as null or empty.
    fn full_config(&self) -> Value {
        let r = &self.resources;
        let boot = r.boot_source.clone().unwrap_or(BootSource {
            kernel_image_path: String::new(),
            initrd_path: None,
            boot_args: None,
        });
        let drives: Vec<Value> = crate::assemble::drives_in_slot_order(&r.drives)
            .into_iter()
            .map(|d| {
                let mut d = d.clone();
                d.is_read_only.get_or_insert(false);
                d.io_engine.get_or_insert(IoEngine::Sync);
                serde_json::to_value(d).unwrap_or(Value::Null)
            })
            .collect();
        json!({
            "balloon": null,
            "drives": drives,
            "boot-source": boot,
            "cpu-config": null,
            "logger": null,
            "machine-config": r.machine_config,
            "metrics": null,
            "mmds-config": null,
            "network-interfaces": r.network_interfaces,
            "vsock": r.vsock,
            "entropy": r.entropy,
            "pmem": [],
            "memory-hotplug": null,
        })
    }

    fn patch_machine_config(&mut self, u: MachineConfigUpdate) -> Result<(), Response> {
        let mut mc = self.resources.machine_config.clone();
        let mut changed = false;
        let mut set = |changed_field: bool| changed |= changed_field;
        if let Some(v) = u.vcpu_count {
            mc.vcpu_count = v;
            set(true);
        }
        if let Some(v) = u.mem_size_mib {
            mc.mem_size_mib = v;
            set(true);
        }
        if let Some(v) = u.smt {
            mc.smt = v;
            set(true);
        }
        if let Some(t) = u.cpu_template {
            mc.cpu_template = (t != "None").then_some(t);
            set(true);
        }
        if let Some(v) = u.track_dirty_pages {
            mc.track_dirty_pages = v;
            set(true);
        }
        if let Some(v) = u.huge_pages {
            mc.huge_pages = v;
            set(true);
        }
        if !changed {
            return Err(Response::bad_request("Empty PATCH request."));
        }
        validate_machine_config(&mc)?;
        self.resources.machine_config = mc;
        Ok(())
    }

    fn instance_info(&self) -> Value {
        let state = match &self.instance {
            None => "Not started",
            Some(i) if i.is_paused() => "Paused",
            Some(_) => "Running",
        };
        json!({
            "app_name": APP_NAME,
            "id": self.id,
            "state": state,
            "vmm_version": FIRECRACKER_VERSION,
        })
    }

    fn pre_boot(&self) -> Result<(), Response> {
        if self.started() {
            return Err(Response::bad_request(NOT_ALLOWED_POST_BOOT));
        }
        Ok(())
    }

    fn post_boot(&self) -> Result<(), Response> {
        if !self.started() {
            return Err(Response::bad_request(NOT_ALLOWED_PRE_BOOT));
        }
        Ok(())
    }

    /// Devices, counting `adding` a new one, must fit on the PCI bus.
    fn check_room(&self, adding: bool) -> Result<(), String> {
        let r = &self.resources;
        let n = r.drives.len()
            + r.network_interfaces.len()
            + usize::from(r.entropy.is_some())
            + usize::from(adding);
        if n > crate::assemble::MAX_DEVICES {
            return Err(format!(
                "at most {} drives, network interfaces and entropy devices fit on rhyve's PCI bus",
                crate::assemble::MAX_DEVICES
            ));
        }
        Ok(())
    }

    /// Firecracker binds the socket here, so a taken path fails this request: the bind is
    /// made and undone (rhyve's device binds it again when the machine is built).
    fn put_vsock(&mut self, v: &Vsock) -> Result<(), Response> {
        let backend = "Vsock config error: Cannot create backend for vsock device";
        std::os::unix::net::UnixListener::bind(&v.uds_path)
            .map_err(|e| {
                vmm_error(
                    backend,
                    format!("Error binding to the host-side Unix socket: {e}"),
                )
            })
            .map(|_| {
                let _ = std::fs::remove_file(&v.uds_path);
            })
    }

    fn put_drive(&mut self, d: Drive) -> Result<(), Response> {
        let create = "Drive config error: Unable to create the virtio block device";
        let path = match (&d.path_on_host, &d.socket) {
            (Some(p), None) => p,
            (None, Some(_)) => {
                return Err(vmm_error(
                    create,
                    "vhost-user drives (socket) are not supported by rhyve.",
                ))
            }
            _ => return Err(vmm_error(create, "Invalid block config.")),
        };
        open_backing_file(path, d.is_read_only == Some(true)).map_err(|e| vmm_error(create, e))?;
        if d.is_root_device
            && self
                .resources
                .drives
                .iter()
                .any(|o| o.is_root_device && o.drive_id != d.drive_id)
        {
            return Err(Response::bad_request(
                "Drive config error: A root block device already exists!",
            ));
        }
        let existing = self
            .resources
            .drives
            .iter()
            .position(|o| o.drive_id == d.drive_id);
        self.check_room(existing.is_none())
            .map_err(|e| vmm_error(create, e))?;
        match existing {
            Some(i) => self.resources.drives[i] = d,
            None => self.resources.drives.push(d),
        }
        Ok(())
    }

    fn patch_drive(&mut self, u: DriveUpdate) -> Result<(), Response> {
        let patch = |e: &dyn std::fmt::Display| {
            Response::bad_request(format!(
                "Drive config error: Unable to patch the block device: {e} Please verify the request arguments."
            ))
        };
        let order = crate::assemble::drives_in_slot_order(&self.resources.drives);
        let Some(index) = order.iter().position(|d| d.drive_id == u.drive_id) else {
            return Err(patch(&"Failed perform action on device: Device not found"));
        };
        if u.path_on_host.is_none() && u.rate_limiter.is_none() {
            return Err(patch(&"Block: Running method expected different backend."));
        }
        let read_only = order[index].is_read_only == Some(true);
        if let Some(p) = &u.path_on_host {
            open_backing_file(p, read_only).map_err(|e| patch(&format!("Block: {e}")))?;
        }
        let rate = u
            .rate_limiter
            .map(|new| merge_limiter(order[index].rate_limiter, new));
        let instance = self.instance.as_ref().ok_or_else(not_started)?;
        instance
            .update_drive(index, u.path_on_host.as_deref(), rate.as_ref())
            .map_err(|e| patch(&e))?;
        if let Some(d) = self
            .resources
            .drives
            .iter_mut()
            .find(|d| d.drive_id == u.drive_id)
        {
            if u.path_on_host.is_some() {
                d.path_on_host = u.path_on_host;
            }
            if rate.is_some() {
                d.rate_limiter = rate;
            }
        }
        Ok(())
    }

    fn put_network(&mut self, n: NetworkInterface) -> Result<(), Response> {
        let create = "Network config error: Could not create the network device";
        if let Some(mac) = &n.guest_mac {
            if !valid_mac(mac) {
                return Err(Response::bad_request(
                    "An error occurred when deserializing the json body of a request: The provided MAC address is invalid.",
                ));
            }
            let lower = mac.to_ascii_lowercase();
            if self.resources.network_interfaces.iter().any(|o| {
                o.iface_id != n.iface_id
                    && o.guest_mac.as_deref().map(str::to_ascii_lowercase) == Some(lower.clone())
            }) {
                return Err(Response::bad_request(format!(
                    "Network config error: The MAC address is already in use: {lower}"
                )));
            }
        }
        if let Some(mtu) = n.mtu {
            if mtu < 68 {
                return Err(vmm_error(
                    create,
                    format!("MTU {mtu} is out of range [68, 65535]"),
                ));
            }
        }
        // The tap is opened now, as Firecracker does, so a wrong name fails this request.
        devices::virtio::tap::Tap::open(&n.host_dev_name).map_err(|e| {
            vmm_error(
                create,
                format!(
                    "Open tap device failed: {e}. Invalid TUN/TAP Backend provided by {}. \
                     Check our documentation on setting up the network devices.",
                    n.host_dev_name
                ),
            )
        })?;
        let existing = self
            .resources
            .network_interfaces
            .iter()
            .position(|o| o.iface_id == n.iface_id);
        self.check_room(existing.is_none())
            .map_err(|e| vmm_error(create, e))?;
        match existing {
            Some(i) => {
                log::warn!("network interface {} is replaced", n.iface_id);
                self.resources.network_interfaces[i] = n
            }
            None => self.resources.network_interfaces.push(n),
        }
        Ok(())
    }

    fn patch_network(&mut self, u: NetworkInterfaceUpdate) -> Result<(), Response> {
        let update = "Network config error: Unable to update the net device";
        let Some(index) = self
            .resources
            .network_interfaces
            .iter()
            .position(|n| n.iface_id == u.iface_id)
        else {
            return Err(vmm_error(
                update,
                "Failed perform action on device: Device not found",
            ));
        };
        let old = &self.resources.network_interfaces[index];
        let rx = u
            .rx_rate_limiter
            .map(|new| merge_limiter(old.rx_rate_limiter, new));
        let tx = u
            .tx_rate_limiter
            .map(|new| merge_limiter(old.tx_rate_limiter, new));
        let instance = self.instance.as_ref().ok_or_else(not_started)?;
        // Interfaces take the slots after the drives'.
        instance
            .update_network(
                self.resources.drives.len() + index,
                rx.as_ref(),
                tx.as_ref(),
            )
            .map_err(|e| vmm_error(update, e))?;
        let n = &mut self.resources.network_interfaces[index];
        if rx.is_some() {
            n.rx_rate_limiter = rx;
        }
        if tx.is_some() {
            n.tx_rate_limiter = tx;
        }
        Ok(())
    }

    fn action(&mut self, a: ActionType) -> Result<Response, Response> {
        match a {
            ActionType::InstanceStart => {
                self.pre_boot()?;
                self.start()?;
                Ok(Response::no_content())
            }
            ActionType::SendCtrlAltDel => {
                self.post_boot()?;
                let i = self.instance.as_ref().ok_or_else(not_started)?;
                i.send_ctrl_alt_del()
                    .map_err(|e| vmm_error("Internal VMM error", e))?;
                Ok(Response::no_content())
            }
            ActionType::FlushMetrics => {
                self.post_boot()?;
                // 204 also without a metrics file, as Firecracker.
                if self.metrics_set {
                    let m = self.instance.as_ref().map_or(json!({}), |i| i.metrics());
                    self.host
                        .flush_metrics(m)
                        .map_err(|e| vmm_error("Internal VMM error: Metrics error", e))?;
                }
                Ok(Response::no_content())
            }
        }
    }

    /// `PUT /snapshot/create`: a full snapshot of the paused VM.
    fn create_snapshot(&self, p: &SnapshotCreateParams) -> Result<Response, Response> {
        let prefix = "Create snapshot error";
        if p.snapshot_type == SnapshotType::Diff {
            return Err(Response::bad_request(
                "The requested operation is not supported: rhyve does not track dirty pages, so it takes Full snapshots only.",
            ));
        }
        let instance = self.instance.as_ref().ok_or_else(not_started)?;
        if !instance.is_paused() {
            return Err(vmm_error(
                prefix,
                "the microVM must be paused first (PATCH /vm {\"state\": \"Paused\"})",
            ));
        }
        // What a load rebuilds the machine from; the logger and metrics are the host's.
        let mut res = self.resources.clone();
        res.logger = None;
        res.metrics = None;
        let json = serde_json::to_vec(&res).map_err(|e| vmm_error(prefix, e))?;
        instance
            .create_snapshot(
                std::path::Path::new(&p.snapshot_path),
                std::path::Path::new(&p.mem_file_path),
                json,
            )
            .map_err(|e| vmm_error(prefix, e))?;
        Ok(Response::no_content())
    }

    /// `PUT /snapshot/load`: only on a fresh process (the logger and metrics aside), as
    /// Firecracker; the machine is the snapshot's, with the overridden taps and socket.
    fn load_snapshot(&mut self, p: SnapshotLoadParams) -> Result<Response, Response> {
        let prefix = "Load snapshot error";
        let r = &self.resources;
        if r.boot_source.is_some()
            || !r.drives.is_empty()
            || !r.network_interfaces.is_empty()
            || r.vsock.is_some()
            || r.entropy.is_some()
            || r.machine_config != MachineConfig::default()
        {
            return Err(vmm_error(
                prefix,
                "Loading a microVM snapshot not allowed after configuring boot-specific resources.",
            ));
        }
        let memory = match (p.mem_file_path, p.mem_backend) {
            (Some(_), Some(_)) => {
                return Err(Response::bad_request(
                    "too many fields: either `mem_backend` or `mem_file_path` exclusively is required.",
                ))
            }
            (None, None) => {
                return Err(Response::bad_request(
                    "missing field: either `mem_backend` or `mem_file_path` is required.",
                ))
            }
            (Some(path), None) => path,
            (None, Some(b)) if b.backend_type == MemBackendType::File => b.backend_path,
            (None, Some(_)) => {
                return Err(Response::bad_request(
                    "The requested operation is not supported: rhyve maps the memory file itself (backend_type File); Uffd is not available.",
                ))
            }
        };
        if p.enable_diff_snapshots || p.track_dirty_pages {
            log::warn!("snapshot load: rhyve does not track dirty pages; later snapshots are Full");
        }
        let state = std::path::PathBuf::from(&p.snapshot_path);
        let snap = vmm::snapshot::Snapshot::read(&state)
            .map_err(|e| vmm_error(prefix, format!("{e:#}")))?;
        let bytes = snap.section(RESOURCES_SECTION).map_err(|_| {
            vmm_error(
                prefix,
                format!(
                    "{}: not a snapshot of this API (rhyvectl --checkpoint's are restored with rhyve -r)",
                    p.snapshot_path
                ),
            )
        })?;
        let mut res: VmResources = serde_json::from_slice(bytes)
            .map_err(|e| vmm_error(prefix, format!("{}: {e}", p.snapshot_path)))?;
        for o in p.network_overrides {
            let iface = res
                .network_interfaces
                .iter_mut()
                .find(|n| n.iface_id == o.iface_id)
                .ok_or_else(|| {
                    vmm_error(
                        prefix,
                        format!(
                            "Invalid network override: the snapshot has no interface {}",
                            o.iface_id
                        ),
                    )
                })?;
            iface.host_dev_name = o.host_dev_name;
        }
        if let Some(v) = p.vsock_override {
            match &mut res.vsock {
                Some(vsock) => vsock.uds_path = v.uds_path,
                None => {
                    return Err(vmm_error(
                        prefix,
                        "Invalid vsock override: the snapshot has no vsock device",
                    ))
                }
            }
        }
        res.logger = self.resources.logger.clone();
        res.metrics = self.resources.metrics.clone();
        let from = RestoreFrom {
            state,
            memory: memory.into(),
            resume: p.resume_vm,
        };
        let instance =
            (self.starter)(&self.id, &res, Some(&from)).map_err(|e| vmm_error(prefix, e))?;
        self.resources = res;
        self.instance = Some(instance);
        Ok(Response::no_content())
    }

    /// InstanceStart: builds and starts the machine. A failure leaves the API before boot,
    /// so the client may fix the resources and try again.
    pub fn start(&mut self) -> Result<(), Response> {
        let start_error = "Start microvm error";
        if self.resources.boot_source.is_none() {
            return Err(vmm_error(
                start_error,
                "Cannot start microvm without kernel configuration.",
            ));
        }
        let cmdline = crate::assemble::kernel_cmdline(&self.resources);
        if cmdline.len() + 1 > CMDLINE_MAX {
            return Err(vmm_error(
                start_error,
                "Invalid kernel command line: Inserting string would make command line too long.",
            ));
        }
        let instance = (self.starter)(&self.id, &self.resources, None)
            .map_err(|e| vmm_error(start_error, e))?;
        self.instance = Some(instance);
        Ok(())
    }
}

/// A PATCH's limiter on top of the current one, as Firecracker's: a bucket given replaces
/// the old one (a zero size or refill time turns it off), a bucket not given stays.
fn merge_limiter(old: Option<RateLimiter>, new: RateLimiter) -> RateLimiter {
    let old = old.unwrap_or_default();
    RateLimiter {
        bandwidth: new.bandwidth.or(old.bandwidth),
        ops: new.ops.or(old.ops),
    }
}

/// Firecracker's kernel command line limit, with its NUL.
const CMDLINE_MAX: usize = 2048;

/// A drive's path and body ids agree (Firecracker's drive wording names neither).
fn drive_id_matches(path_id: &str, body_id: &str) -> Result<(), Response> {
    if path_id != body_id {
        return Err(Response::bad_request(
            "The id from the path does not match the id from the body!",
        ));
    }
    Ok(())
}

/// An interface's path and body ids agree.
fn id_matches(path_id: &str, body_id: &str) -> Result<(), Response> {
    if path_id != body_id {
        return Err(Response::bad_request(format!(
            "The id from the path [{path_id}] does not match the id from the body [{body_id}]!"
        )));
    }
    Ok(())
}

fn check_boot_source(b: &BootSource) -> Result<(), Response> {
    std::fs::File::open(&b.kernel_image_path).map_err(|e| {
        vmm_error(
            "Boot source error",
            format!("The kernel file cannot be opened: {e}"),
        )
    })?;
    if let Some(i) = &b.initrd_path {
        std::fs::File::open(i).map_err(|e| {
            vmm_error(
                "Boot source error",
                format!(
                    "The initrd file cannot be opened due to invalid path or invalid permissions. {e}"
                ),
            )
        })?;
    }
    if let Some(args) = &b.boot_args {
        if args.len() + 1 > CMDLINE_MAX {
            return Err(vmm_error(
                "Boot source error",
                "The kernel command line is invalid: Invalid cmdline capacity provided.",
            ));
        }
    }
    Ok(())
}

/// Opens a drive's file as the device will (read-write unless read-only).
fn open_backing_file(path: &str, read_only: bool) -> Result<(), String> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(!read_only)
        .open(path)
        .map(drop)
        .map_err(|e| {
            format!("Virtio backend error: Error manipulating the backing file: {e} {path}")
        })
}

fn validate_machine_config(mc: &MachineConfig) -> Result<(), Response> {
    let error = "Machine config error";
    if mc.vcpu_count == 0
        || mc.vcpu_count > 32
        || (mc.smt && mc.vcpu_count > 1 && !mc.vcpu_count.is_multiple_of(2))
    {
        return Err(vmm_error(
            error,
            "The number of vCPUs must be greater than 0, less than 32 and must be 1 or an even number if SMT is enabled.",
        ));
    }
    if mc.mem_size_mib == 0
        || (mc.huge_pages != HugePages::None && !mc.mem_size_mib.is_multiple_of(2))
    {
        return Err(vmm_error(
            error,
            "The memory size (MiB) is either 0, or not a multiple of the configured page size.",
        ));
    }
    if let Some(t) = &mc.cpu_template {
        if t != "None" {
            return Err(vmm_error(
                error,
                format!("CPU template {t} is not supported by rhyve (only \"None\")."),
            ));
        }
    }
    Ok(())
}

fn valid_mac(mac: &str) -> bool {
    let parts: Vec<&str> = mac.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()))
}

/// `--config-file`'s resources, through the same checks as the requests that set them.
pub fn check_resources(res: &VmResources) -> Result<(), String> {
    let fault = |r: Response| {
        r.body
            .and_then(|b| {
                b.get("fault_message")
                    .and_then(|m| m.as_str())
                    .map(String::from)
            })
            .unwrap_or_default()
    };
    validate_machine_config(&res.machine_config).map_err(fault)?;
    if let Some(b) = &res.boot_source {
        check_boot_source(b).map_err(fault)?;
    }
    let mut api = Api::new(
        "check",
        VmResources::default(),
        Box::new(|_, _, _| Err("not started".into())),
        Box::new(NoHost),
    );
    for d in &res.drives {
        api.put_drive(d.clone()).map_err(fault)?;
    }
    for n in &res.network_interfaces {
        api.put_network(n.clone()).map_err(fault)?;
    }
    if let Some(v) = &res.vsock {
        api.put_vsock(v).map_err(fault)?;
    }
    Ok(())
}

/// Effects nobody sees (checking a configuration).
struct NoHost;

impl Host for NoHost {
    fn configure_logger(&mut self, _: &Logger) -> Result<(), String> {
        Ok(())
    }
    fn configure_metrics(&mut self, _: &Metrics) -> Result<(), String> {
        Ok(())
    }
    fn flush_metrics(&mut self, _: Value) -> Result<(), String> {
        Ok(())
    }
}

fn not_started() -> Response {
    Response::bad_request(NOT_ALLOWED_PRE_BOOT)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// An instance that records what it was asked.
    #[derive(Default)]
    struct Recorded {
        paused: Mutex<bool>,
        calls: Mutex<Vec<String>>,
    }

    struct Handle(Arc<Recorded>);

    impl Instance for Handle {
        fn pause(&self) -> Result<(), String> {
            *self.0.paused.lock().unwrap() = true;
            Ok(())
        }
        fn resume(&self) -> Result<(), String> {
            *self.0.paused.lock().unwrap() = false;
            Ok(())
        }
        fn is_paused(&self) -> bool {
            *self.0.paused.lock().unwrap()
        }
        fn send_ctrl_alt_del(&self) -> Result<(), String> {
            self.0.calls.lock().unwrap().push("ctrl-alt-del".into());
            Ok(())
        }
        fn metrics(&self) -> Value {
            json!({})
        }
        fn update_drive(
            &self,
            index: usize,
            path: Option<&str>,
            _: Option<&RateLimiter>,
        ) -> Result<(), String> {
            self.0
                .calls
                .lock()
                .unwrap()
                .push(format!("drive {index} {path:?}"));
            Ok(())
        }
        fn update_network(
            &self,
            _: usize,
            _: Option<&RateLimiter>,
            _: Option<&RateLimiter>,
        ) -> Result<(), String> {
            Ok(())
        }
        /// A state file with just the resources (rhyve's VMM writes the rest).
        fn create_snapshot(
            &self,
            state: &std::path::Path,
            memory: &std::path::Path,
            resources: Vec<u8>,
        ) -> Result<(), String> {
            let mut snap = vmm::snapshot::Snapshot::default();
            snap.add(RESOURCES_SECTION, resources);
            std::fs::write(state, snap.encode()).map_err(|e| e.to_string())?;
            std::fs::write(memory, []).map_err(|e| e.to_string())?;
            self.0.calls.lock().unwrap().push("snapshot".into());
            Ok(())
        }
    }

    fn api() -> (Api, Arc<Recorded>, Arc<Mutex<Option<VmResources>>>) {
        let rec = Arc::new(Recorded::default());
        let started = Arc::new(Mutex::new(None));
        let (r, s) = (rec.clone(), started.clone());
        let starter: Starter = Box::new(move |_, res, _| {
            *s.lock().unwrap() = Some(res.clone());
            Ok(Box::new(Handle(r.clone())))
        });
        (
            Api::new("vm1", VmResources::default(), starter, Box::new(NoHost)),
            rec,
            started,
        )
    }

    fn fault_of(r: Response) -> String {
        assert_eq!(r.status, 400, "{r:?}");
        r.body.unwrap()["fault_message"]
            .as_str()
            .unwrap()
            .to_string()
    }

    fn image(tag: &str) -> String {
        let p = std::env::temp_dir().join(format!("fcapi-{tag}-{}", std::process::id()));
        std::fs::write(&p, [0u8; 512]).unwrap();
        p.display().to_string()
    }

    #[test]
    fn resources_accumulate_and_start_gets_them() {
        let (mut a, rec, started) = api();
        let k = image("kernel");
        let put = |a: &mut Api, path: &str, body: String| a.handle("PUT", path, body.as_bytes());
        assert_eq!(
            put(
                &mut a,
                "/machine-config",
                r#"{"vcpu_count":2,"mem_size_mib":256}"#.into()
            )
            .status,
            204
        );
        assert_eq!(
            put(
                &mut a,
                "/boot-source",
                format!(r#"{{"kernel_image_path":"{k}"}}"#)
            )
            .status,
            204
        );
        let d = image("disk");
        for id in ["data", "rootfs"] {
            let body = format!(
                r#"{{"drive_id":"{id}","path_on_host":"{d}","is_root_device":{}}}"#,
                id == "rootfs"
            );
            assert_eq!(put(&mut a, &format!("/drives/{id}"), body).status, 204);
        }
        // A second root device is refused.
        let second_root =
            format!(r#"{{"drive_id":"r2","path_on_host":"{d}","is_root_device":true}}"#);
        assert_eq!(
            fault_of(put(&mut a, "/drives/r2", second_root)),
            "Drive config error: A root block device already exists!"
        );
        let r = put(
            &mut a,
            "/actions",
            r#"{"action_type":"InstanceStart"}"#.into(),
        );
        assert_eq!(r.status, 204);
        let res = started.lock().unwrap().clone().unwrap();
        assert_eq!(res.machine_config.vcpu_count, 2);
        assert_eq!(res.drives.len(), 2);
        // Post-boot: PATCH /drives goes to the root drive's slot index (0: it is first).
        let patch = format!(r#"{{"drive_id":"rootfs","path_on_host":"{d}"}}"#);
        assert_eq!(
            a.handle("PATCH", "/drives/rootfs", patch.as_bytes()).status,
            204
        );
        assert_eq!(
            a.handle("PUT", "/actions", br#"{"action_type":"SendCtrlAltDel"}"#)
                .status,
            204
        );
        assert_eq!(
            *rec.calls.lock().unwrap(),
            [format!("drive 0 Some({d:?})"), "ctrl-alt-del".to_string()]
        );
        assert_eq!(
            a.handle("PATCH", "/vm", br#"{"state":"Paused"}"#).status,
            204
        );
        let info = a.handle("GET", "/", b"").body.unwrap();
        assert_eq!(info["state"], "Paused");
        assert_eq!(
            fault_of(put(
                &mut a,
                "/machine-config",
                r#"{"vcpu_count":1,"mem_size_mib":128}"#.into()
            )),
            NOT_ALLOWED_POST_BOOT
        );
    }

    #[test]
    fn put_machine_config_resets_what_it_omits_but_keeps_the_template() {
        let (mut a, _, _) = api();
        let r = a.handle(
            "PUT",
            "/machine-config",
            br#"{"vcpu_count":2,"mem_size_mib":256,"smt":true,"cpu_template":"None"}"#,
        );
        assert_eq!(r.status, 204);
        assert_eq!(
            a.handle("PATCH", "/machine-config", br#"{"mem_size_mib":512}"#)
                .status,
            204
        );
        let mc = a.handle("GET", "/machine-config", b"").body.unwrap();
        assert_eq!(
            (
                mc["vcpu_count"].as_u64(),
                mc["mem_size_mib"].as_u64(),
                mc["smt"].as_bool()
            ),
            (Some(2), Some(512), Some(true))
        );
        assert!(mc.get("cpu_template").is_none(), "{mc}");
        a.handle(
            "PUT",
            "/machine-config",
            br#"{"vcpu_count":1,"mem_size_mib":128}"#,
        );
        let mc = a.handle("GET", "/machine-config", b"").body.unwrap();
        assert_eq!(mc["smt"], false);
    }

    #[test]
    fn trailing_path_tokens_are_ignored_and_unknown_ones_named() {
        let (mut a, _, _) = api();
        assert_eq!(a.handle("GET", "/machine-config/extra", b"").status, 200);
        assert_eq!(
            fault_of(a.handle("DELETE", "/drives/x", b"")),
            "Invalid request method and/or path: DELETE drives."
        );
        assert_eq!(
            fault_of(a.handle("GET", "/vm", b"")),
            "Invalid request method and/or path: GET vm."
        );
    }

    #[test]
    fn snapshots_are_created_paused_and_loaded_on_a_fresh_api() {
        let (mut a, rec, _) = api();
        let k = image("snap-kernel");
        let put = |a: &mut Api, path: &str, body: &str| a.handle("PUT", path, body.as_bytes());
        let dir = std::env::temp_dir().join(format!("fcapi-snap-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (state, mem) = (dir.join("vm.snap"), dir.join("vm.mem"));
        let create = format!(
            r#"{{"snapshot_path":"{}","mem_file_path":"{}"}}"#,
            state.display(),
            mem.display()
        );
        assert_eq!(
            fault_of(put(&mut a, "/snapshot/create", &create)),
            NOT_ALLOWED_PRE_BOOT
        );
        let boot = format!(r#"{{"kernel_image_path":"{k}"}}"#);
        assert_eq!(put(&mut a, "/boot-source", &boot).status, 204);
        // (PUT /network-interfaces opens the tap: a unit test has none.)
        a.resources
            .network_interfaces
            .push(serde_json::from_str(r#"{"iface_id":"eth0","host_dev_name":"tap0"}"#).unwrap());
        let start = r#"{"action_type":"InstanceStart"}"#;
        assert_eq!(put(&mut a, "/actions", start).status, 204);
        assert!(fault_of(put(&mut a, "/snapshot/create", &create))
            .starts_with("Create snapshot error: the microVM must be paused"));
        assert_eq!(
            a.handle("PATCH", "/vm", br#"{"state":"Paused"}"#).status,
            204
        );
        let diff = create.replacen('{', r#"{"snapshot_type":"Diff","#, 1);
        assert!(fault_of(put(&mut a, "/snapshot/create", &diff)).contains("Full snapshots only"));
        assert_eq!(put(&mut a, "/snapshot/create", &create).status, 204);
        assert_eq!(rec.calls.lock().unwrap().as_slice(), ["snapshot"]);

        // A fresh API loads it, with the interface on another tap.
        let loaded = Arc::new(Mutex::new(None));
        let l = loaded.clone();
        let starter: Starter = Box::new(move |_, res, from| {
            *l.lock().unwrap() = Some((res.clone(), from.cloned()));
            Ok(Box::new(Handle(Arc::default())))
        });
        let mut b = Api::new("vm2", VmResources::default(), starter, Box::new(NoHost));
        let load = |mem: &str, extra: &str| {
            format!(
                r#"{{"snapshot_path":"{}",{mem}"network_overrides":[{{"iface_id":"eth0","host_dev_name":"tap9"}}]{extra}}}"#,
                state.display()
            )
        };
        let mem_file = format!(r#""mem_file_path":"{}","#, mem.display());
        let backend = format!(
            r#""mem_backend":{{"backend_type":"File","backend_path":"{}"}},"#,
            mem.display()
        );
        assert!(fault_of(put(&mut b, "/snapshot/load", &load("", ""))).starts_with("missing field"));
        let both = format!("{mem_file}{backend}");
        assert!(fault_of(put(&mut b, "/snapshot/load", &load(&both, ""))).starts_with("too many"));
        let uffd = backend.replace("File", "Uffd");
        assert!(fault_of(put(&mut b, "/snapshot/load", &load(&uffd, ""))).contains("Uffd"));
        assert_eq!(
            put(
                &mut b,
                "/snapshot/load",
                &load(&backend, r#","resume_vm":true"#)
            )
            .status,
            204
        );
        let (res, from) = loaded.lock().unwrap().clone().unwrap();
        assert_eq!(res.network_interfaces[0].host_dev_name, "tap9");
        assert_eq!(res.boot_source.unwrap().kernel_image_path, k);
        assert_eq!(
            from,
            Some(RestoreFrom {
                state: state.clone(),
                memory: mem.clone(),
                resume: true
            })
        );
        // Loaded: no InstanceStart, no second load.
        assert_eq!(
            fault_of(put(&mut b, "/actions", start)),
            NOT_ALLOWED_POST_BOOT
        );

        // Not on an API that was configured first.
        let (mut c, _, _) = api();
        assert_eq!(put(&mut c, "/boot-source", &boot).status, 204);
        assert_eq!(
            fault_of(put(&mut c, "/snapshot/load", &load(&mem_file, ""))),
            "Load snapshot error: Loading a microVM snapshot not allowed after configuring boot-specific resources."
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}

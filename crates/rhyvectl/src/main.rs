//! rhyvectl: bhyvectl(8) for rhyve. Named VM objects are handled through vmmapi (create,
//! destroy, list); everything about a running VM goes through its control socket
//! (docs/control-protocol.md).

mod cli;
mod client;

use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

use cli::{Args, Get, CONTROL, DEBUG, GPRS, SEGMENTS, TABLES};
use client::{Client, Request};

const USAGE: &str = "\
usage: rhyvectl --list [--json]
       rhyvectl --vm=NAME [--cpu=N] [--json] ACTION...

Named VM objects ($RHYVE_RUNDIR/NAME, default /run/rhyve/NAME):
  --create [--set-mem=SIZE]   create a persistent VM object (SIZE in MB, or with K/M/G; default 256M)
  --destroy                   remove the object; a running VM is powered off first
  --list                      every VM object: state, vCPUs, memory, pid

A running VM (through RUNDIR/NAME/control.sock):
  --get-stats                 per vCPU exits by reason and time in KVM_RUN; device accesses
  --get-all                   registers, control registers, segments and stats of --cpu (default 0)
  --get-REG                   REG: rax rbx rcx rdx rsi rdi rbp rsp r8..r15 rip rflags
                              cr0 cr2 cr3 cr4 cr8 efer; dr0-dr3 dr6 dr7;
                              cs ds es fs gs ss tr ldtr (selectors)
  --get-desc-SEG              descriptor base/limit/access of SEG (or gdtr, idtr)
  --set-REG=VALUE             set a register (the VM must be paused: --pause)
  --set-desc-SEG --desc-base=B --desc-limit=L --desc-access=A
  --pause, --resume           stop and restart every vCPU
  --inject-nmi                send an NMI to --cpu
  --checkpoint=FILE           save the VM to FILE (guest memory) and FILE.kern (vCPUs,
                              devices); it pauses meanwhile. rhyve -r FILE restores it
  --suspend=FILE              the same, then rhyve exits (status 0)
  --force-reset               end rhyve as if the guest reset (exit status 0)
  --force-poweroff            end rhyve as if the guest powered off (exit status 1)

Actions run in this order: create, pause, set, inject-nmi, get, stats, checkpoint,
resume, force-reset/force-poweroff, destroy. Output is human-readable; --json prints one JSON
object. Errors: one line on stderr, exit status 1 (2 for bad arguments).
";

fn main() {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let args = match cli::parse(&argv) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("rhyvectl: {e}");
            std::process::exit(2);
        }
    };
    if args.help {
        print!("{USAGE}");
        return;
    }
    let mut out = Out {
        json: Map::new(),
        text: String::new(),
    };
    let result = run(&args, &mut out);
    // What was done before a failure is still reported.
    if args.json {
        if !out.json.is_empty() || result.is_ok() {
            println!("{}", Value::Object(out.json));
        }
    } else {
        print!("{}", out.text);
    }
    if let Err(e) = result {
        eprintln!("rhyvectl: {e}");
        std::process::exit(1);
    }
}

/// Both renderings, built side by side; main prints one.
struct Out {
    json: Map<String, Value>,
    text: String,
}

impl Out {
    fn line(&mut self, s: impl AsRef<str>) {
        self.text.push_str(s.as_ref());
        self.text.push('\n');
    }
}

fn run(a: &Args, out: &mut Out) -> Result<(), String> {
    if a.list {
        return list(out);
    }
    let name = a.vm.as_deref().unwrap_or_default();
    if !vmmapi::valid_vm_name(name) {
        return Err(format!(
            "--vm: invalid VM name {name:?}: use letters, digits, '-', '_' and '.', at most 64 characters"
        ));
    }
    let dir = vmmapi::rundir_base().join(name);
    out.json.insert("vm".into(), json!(name));
    if a.create {
        let bytes = a.mem_bytes.unwrap_or(256 << 20);
        // Dropping the object releases it; a persistent object stays.
        vmmapi::VmObject::create(name, bytes).map_err(|e| e.to_string())?;
        out.json
            .insert("created".into(), json!({ "memory": bytes }));
        out.line(format!("created {name} ({} MiB)", bytes >> 20));
    }
    if a.needs_socket() {
        let mut c = connect(name, &dir)?;
        control(a, &mut c, out)?;
    }
    if a.destroy {
        destroy(name, &dir)?;
        out.json.insert("destroyed".into(), json!(true));
        out.line(format!("destroyed {name}"));
    }
    Ok(())
}

/// The running VM's socket, or why there is none.
fn connect(name: &str, dir: &Path) -> Result<Client, String> {
    let state = vmmapi::list()
        .map_err(|e| e.to_string())?
        .into_iter()
        .find(|o| o.name == name)
        .map(|o| o.state);
    match state {
        None => Err(format!("no VM named {name}")),
        Some(vmmapi::ObjectState::Running { pid }) => {
            if !dir.join(client::SOCKET_NAME).exists() {
                return Err(format!(
                    "VM {name} is in use by pid {pid} but has no control socket (still loading?)"
                ));
            }
            Client::connect(dir).map_err(|e| format!("VM {name}: {e}"))
        }
        Some(vmmapi::ObjectState::Stale { pid }) => Err(format!(
            "VM {name} is stale (pid {pid} is gone): rhyvectl --vm={name} --destroy removes it"
        )),
        Some(s) => Err(format!("VM {name} is not running ({s})")),
    }
}

fn fields(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

fn control(a: &Args, c: &mut Client, out: &mut Out) -> Result<(), String> {
    let cpu = a.cpu.unwrap_or(0);
    if a.pause {
        c.call(Request::Pause, Map::new())?;
        out.json.insert("paused".into(), json!(true));
        out.line("paused");
    }
    if !a.sets.is_empty() || !a.set_descs.is_empty() {
        let regs: Map<String, Value> = a
            .sets
            .iter()
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect();
        let mut desc = Map::new();
        for seg in &a.set_descs {
            let mut d = Map::new();
            for (k, v) in [
                ("base", a.desc_base),
                ("limit", a.desc_limit),
                // Descriptor tables have no access rights.
                ("access", a.desc_access.filter(|_| !TABLES.contains(seg))),
            ] {
                if let Some(v) = v {
                    d.insert(k.into(), json!(v));
                }
            }
            desc.insert(seg.to_string(), Value::Object(d));
        }
        c.call(
            Request::SetRegs,
            fields(json!({ "cpu": cpu, "regs": regs, "desc": desc })),
        )?;
        let mut set: Map<String, Value> = regs;
        for (k, v) in desc {
            set.insert(format!("desc-{k}"), v);
        }
        for (k, v) in &set {
            out.line(format!("set {k}[{cpu}] = {}", show_set(v)));
        }
        out.json.insert("set".into(), Value::Object(set));
    }
    if a.inject_nmi {
        c.call(Request::Nmi, fields(json!({ "cpu": cpu })))?;
        out.json.insert("nmi".into(), json!({ "cpu": cpu }));
        out.line(format!("nmi sent to vcpu {cpu}"));
    }
    if a.get_all || !a.gets.is_empty() {
        let r = c.call(Request::GetRegs, fields(json!({ "cpu": cpu })))?;
        let gets: Vec<Get> = if a.get_all {
            all_gets()
        } else {
            a.gets.clone()
        };
        let mut regs = Map::new();
        for g in &gets {
            show_get(&r, g, cpu, &mut regs, out)?;
        }
        out.json.insert("cpu".into(), json!(cpu));
        out.json.insert("registers".into(), Value::Object(regs));
    }
    if a.get_stats || a.get_all {
        let s = c.call(Request::Stats, Map::new())?;
        show_stats(&s, a.cpu, out);
        let mut s = fields(s);
        s.remove("ok");
        s.remove("version");
        out.json.insert("stats".into(), Value::Object(s));
    }
    if let Some(file) = &a.checkpoint {
        // rhyve opens the file: give it an absolute path.
        let file = if file.is_absolute() {
            file.clone()
        } else {
            std::env::current_dir()
                .map_err(|e| format!("--checkpoint: the current directory: {e}"))?
                .join(file)
        };
        c.set_response_timeout(Duration::from_secs(600));
        let r = c.call(
            Request::Checkpoint,
            fields(json!({ "file": file.display().to_string(), "suspend": a.suspend })),
        )?;
        let mut r = fields(r);
        r.remove("ok");
        r.remove("version");
        out.line(format!(
            "{} {}: {} MiB of memory, {} KiB of state, {:.1} ms{}",
            if a.suspend {
                "suspended to"
            } else {
                "checkpoint"
            },
            file.display(),
            r.get("memory_bytes").and_then(Value::as_u64).unwrap_or(0) >> 20,
            r.get("state_bytes").and_then(Value::as_u64).unwrap_or(0) >> 10,
            r.get("ms").and_then(Value::as_f64).unwrap_or(0.0),
            if a.suspend { "; rhyve exits" } else { "" }
        ));
        out.json.insert("checkpoint".into(), Value::Object(r));
    }
    if a.resume {
        c.call(Request::Resume, Map::new())?;
        out.json.insert("resumed".into(), json!(true));
        out.line("resumed");
    }
    if a.force_reset || a.force_poweroff {
        let (req, what) = if a.force_reset {
            (Request::Reset, "reset")
        } else {
            (Request::PowerOff, "powered off")
        };
        let pid = c
            .call(Request::Info, Map::new())?
            .get("pid")
            .and_then(Value::as_u64);
        let r = c.call(req, Map::new())?;
        let status = r.get("exit_status").cloned().unwrap_or(Value::Null);
        out.json.insert(
            req.name().into(),
            json!({ "exit_status": status, "pid": pid }),
        );
        out.line(format!("{what}: rhyve exits with status {status}"));
    }
    Ok(())
}

fn show_set(v: &Value) -> String {
    match v {
        Value::Number(n) => n.as_u64().map(|n| format!("{n:#x}")).unwrap_or_default(),
        other => other.to_string(),
    }
}

fn all_gets() -> Vec<Get> {
    let mut g: Vec<Get> = GPRS
        .iter()
        .chain(CONTROL)
        .chain(DEBUG)
        .map(|&n| Get::Reg(n))
        .collect();
    g.extend(SEGMENTS.iter().chain(TABLES).map(|&n| Get::Desc(n)));
    g.extend(SEGMENTS.iter().map(|&n| Get::Reg(n)));
    g
}

/// Prints one register the bhyvectl way (`rip[0]\t\t0x…`) and records it for --json.
fn show_get(
    r: &Value,
    g: &Get,
    cpu: u32,
    regs: &mut Map<String, Value>,
    out: &mut Out,
) -> Result<(), String> {
    let missing = |n: &str| format!("rhyve's answer lacks {n}");
    match *g {
        Get::Reg(n) if SEGMENTS.contains(&n) => {
            let sel = r["segments"][n]["selector"]
                .as_u64()
                .ok_or_else(|| missing(n))?;
            out.line(format!("{n}[{cpu}]\t\t0x{sel:04x}"));
            regs.insert(n.into(), json!(sel));
        }
        Get::Reg(n) => {
            let v = r["regs"][n]
                .as_u64()
                .or_else(|| r["control"][n].as_u64())
                .or_else(|| r["debug"][n].as_u64())
                .ok_or_else(|| missing(n))?;
            out.line(format!("{n}[{cpu}]\t\t0x{v:016x}"));
            regs.insert(n.into(), json!(v));
        }
        Get::Desc(n) => {
            let d = &r["segments"][n];
            let base = d["base"].as_u64().ok_or_else(|| missing(n))?;
            let limit = d["limit"].as_u64().ok_or_else(|| missing(n))?;
            if TABLES.contains(&n) {
                out.line(format!("{n}[{cpu}]\t\t0x{base:016x}/0x{limit:08x}"));
                regs.insert(format!("desc-{n}"), json!({ "base": base, "limit": limit }));
            } else {
                let access = d["access"].as_u64().ok_or_else(|| missing(n))?;
                out.line(format!(
                    "{n} desc[{cpu}]\t0x{base:016x}/0x{limit:08x}/0x{access:08x}"
                ));
                regs.insert(
                    format!("desc-{n}"),
                    json!({ "base": base, "limit": limit, "access": access }),
                );
            }
        }
    }
    Ok(())
}

fn show_stats(s: &Value, only: Option<u32>, out: &mut Out) {
    let empty = Vec::new();
    for v in s["vcpus"].as_array().unwrap_or(&empty) {
        let cpu = v["cpu"].as_u64().unwrap_or(0);
        if only.is_some_and(|c| u64::from(c) != cpu) {
            continue;
        }
        let e = &v["exits"];
        let n = |k: &str| e[k].as_u64().unwrap_or(0);
        let mut t = format!("vcpu{cpu} stats:\n");
        for (label, k) in [
            ("exits, total", "total"),
            ("exits, port I/O", "pio"),
            ("exits, MMIO", "mmio"),
            ("exits, interrupted (signal or kick)", "interrupted"),
            ("exits, other", "other"),
        ] {
            let _ = writeln!(t, "{label:<40}\t{}", n(k));
        }
        let ns = v["run_ns"].as_u64().unwrap_or(0);
        let _ = write!(
            t,
            "{:<40}\t{}.{:06} s",
            "time in KVM_RUN",
            ns / 1_000_000_000,
            ns % 1_000_000_000 / 1000
        );
        out.line(t);
        let devs = v["devices"].as_array().unwrap_or(&empty);
        if !devs.is_empty() {
            out.line(format!("exits per device (vcpu{cpu}):"));
        }
        for d in devs {
            out.line(format!(
                "    {:<4} {:#010x}  {:<24}\t{}",
                d["bus"].as_str().unwrap_or("?"),
                d["base"].as_u64().unwrap_or(0),
                d["name"].as_str().unwrap_or("?"),
                d["exits"].as_u64().unwrap_or(0)
            ));
        }
    }
    out.line("device accesses (all vCPUs):");
    for d in s["devices"].as_array().unwrap_or(&empty) {
        out.line(format!(
            "  {:<4} {:#010x}  {:<24}\t{}",
            d["bus"].as_str().unwrap_or("?"),
            d["base"].as_u64().unwrap_or(0),
            d["name"].as_str().unwrap_or("?"),
            d["accesses"].as_u64().unwrap_or(0)
        ));
    }
    let pci = s["pci"].as_array().unwrap_or(&empty);
    if !pci.is_empty() {
        out.line("PCI devices:");
    }
    for d in pci {
        let counters: Vec<String> = d["counters"]
            .as_object()
            .map(|m| m.iter().map(|(k, v)| format!("{k}={v}")).collect())
            .unwrap_or_default();
        out.line(format!(
            "  {:<22} {:<8} {:<12} {}",
            d["id"].as_str().unwrap_or("?"),
            d["address"].as_str().unwrap_or("?"),
            d["state"].as_str().unwrap_or("?"),
            counters.join(" ")
        ));
    }
    out.line(format!(
        "unhandled accesses: pio {}, mmio {}",
        s["unhandled"]["pio"].as_u64().unwrap_or(0),
        s["unhandled"]["mmio"].as_u64().unwrap_or(0)
    ));
}

/// Every object with its state; running ones are asked for vCPUs, memory and pause state.
fn list(out: &mut Out) -> Result<(), String> {
    let objects = vmmapi::list().map_err(|e| e.to_string())?;
    let mut vms = Vec::new();
    out.line(format!(
        "{:<20} {:<10} {:>5} {:>9} {:>8}  {}",
        "NAME", "STATE", "VCPUS", "MEMORY", "PID", "KIND"
    ));
    for o in objects {
        let (mut state, mut pid) = match o.state {
            vmmapi::ObjectState::Running { pid } => ("running".to_string(), Some(pid)),
            vmmapi::ObjectState::Stale { pid } => ("stale".to_string(), Some(pid)),
            vmmapi::ObjectState::Loaded => ("loaded".to_string(), None),
            vmmapi::ObjectState::Created => ("created".to_string(), None),
        };
        let (mut vcpus, mut memory) = (None, o.ram_bytes);
        if matches!(o.state, vmmapi::ObjectState::Running { .. }) {
            match Client::connect(&o.path).and_then(|mut c| c.call(Request::Info, Map::new())) {
                Ok(i) => {
                    state = i["state"].as_str().unwrap_or("running").to_string();
                    vcpus = i["vcpus"].as_u64();
                    memory = i["memory"].as_u64().or(memory);
                    pid = i["pid"].as_i64().map(|p| p as i32).or(pid);
                }
                // rhyveload holds the object while loading; no socket then.
                Err(_) => state = "busy".to_string(),
            }
        }
        let kind = if o.persistent {
            "persistent"
        } else {
            "ephemeral"
        };
        let dash = |v: Option<String>| v.unwrap_or_else(|| "-".into());
        out.line(format!(
            "{:<20} {:<10} {:>5} {:>9} {:>8}  {kind}",
            o.name,
            state,
            dash(vcpus.map(|v| v.to_string())),
            dash(memory.map(|m| format!("{}M", m >> 20))),
            dash(pid.map(|p| p.to_string())),
        ));
        vms.push(json!({
            "name": o.name,
            "path": o.path.display().to_string(),
            "state": state,
            "vcpus": vcpus,
            "memory": memory,
            "pid": pid,
            "persistent": o.persistent,
        }));
    }
    out.json.insert("vms".into(), Value::Array(vms));
    Ok(())
}

/// bhyvectl --destroy: an idle or stale object is removed; a running VM is powered off
/// over its socket first (bhyve's kernel VM would be torn down under the running bhyve,
/// which then exits with an error), then removed once its process has let go of it.
fn destroy(name: &str, dir: &Path) -> Result<(), String> {
    match vmmapi::destroy(name) {
        Ok(()) => Ok(()),
        Err(vmmapi::Error::InUse { pid, .. }) => {
            let mut c = Client::connect(dir).map_err(|e| {
                format!("VM {name} is in use by pid {pid} and cannot be powered off: {e}")
            })?;
            c.call(Request::PowerOff, Map::new())?;
            wait_released(name, Duration::from_secs(15))?;
            match vmmapi::destroy(name) {
                // An ephemeral object is removed by rhyve itself on exit.
                Ok(()) | Err(vmmapi::Error::NoObject(_)) => Ok(()),
                Err(e) => Err(e.to_string()),
            }
        }
        Err(e) => Err(e.to_string()),
    }
}

/// Waits until no process holds object `name` (its lock goes when the process exits, even
/// before its parent reaps it).
fn wait_released(name: &str, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        let running = vmmapi::list()
            .map_err(|e| e.to_string())?
            .into_iter()
            .any(|o| o.name == name && matches!(o.state, vmmapi::ObjectState::Running { .. }));
        if !running {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "VM {name} was told to power off but still runs after {} s",
                timeout.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_print_like_bhyvectl() {
        let r = json!({
            "regs": {"rip": 0x108f8f_u64},
            "control": {"cr3": 0x9000},
            "segments": {"cs": {"selector": 16, "base": 0, "limit": 0xffffffff_u64, "access": 0xa09b},
                         "gdtr": {"base": 0x5000, "limit": 39}},
        });
        let mut out = Out {
            json: Map::new(),
            text: String::new(),
        };
        let mut regs = Map::new();
        for g in [
            Get::Reg("rip"),
            Get::Reg("cr3"),
            Get::Reg("cs"),
            Get::Desc("cs"),
            Get::Desc("gdtr"),
        ] {
            show_get(&r, &g, 0, &mut regs, &mut out).unwrap();
        }
        assert_eq!(
            out.text,
            "rip[0]\t\t0x0000000000108f8f\ncr3[0]\t\t0x0000000000009000\ncs[0]\t\t0x0010\n\
             cs desc[0]\t0x0000000000000000/0xffffffff/0x0000a09b\ngdtr[0]\t\t0x0000000000005000/0x00000027\n"
        );
        assert_eq!(regs["rip"], json!(0x108f8f));
        assert_eq!(regs["desc-cs"]["access"], json!(0xa09b));
        assert!(show_get(&r, &Get::Reg("rax"), 0, &mut regs, &mut out).is_err());
    }

    #[test]
    fn get_all_covers_every_register() {
        let g = all_gets();
        assert!(g.contains(&Get::Reg("rip")) && g.contains(&Get::Reg("efer")));
        assert!(g.contains(&Get::Desc("idtr")) && g.contains(&Get::Reg("ldtr")));
        assert_eq!(
            g.len(),
            GPRS.len() + CONTROL.len() + DEBUG.len() + 2 * SEGMENTS.len() + TABLES.len()
        );
    }
}

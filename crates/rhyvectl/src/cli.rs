//! bhyvectl(8)'s command line: `--opt` and `--opt=VALUE` (or `--opt VALUE`) long options.

use std::collections::BTreeMap;

/// General-purpose registers and RIP/RFLAGS (`--get-rax`, `--set-rax=V`, …).
pub const GPRS: &[&str] = &[
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10", "r11", "r12", "r13",
    "r14", "r15", "rip", "rflags",
];
/// Control registers and EFER (`--get-cr0`, …).
pub const CONTROL: &[&str] = &["cr0", "cr2", "cr3", "cr4", "cr8", "efer"];
/// Debug registers (`--get-dr7`, `--set-dr7=V`).
pub const DEBUG: &[&str] = &["dr0", "dr1", "dr2", "dr3", "dr6", "dr7"];
/// Segment registers: `--get-cs` is the selector, `--get-desc-cs` the descriptor.
pub const SEGMENTS: &[&str] = &["cs", "ds", "es", "fs", "gs", "ss", "tr", "ldtr"];
/// Descriptor tables (`--get-desc-gdtr`).
pub const TABLES: &[&str] = &["gdtr", "idtr"];

/// What to read: a register, a selector, or a descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Get {
    Reg(&'static str),
    Desc(&'static str),
}

/// Everything the command line asked for.
#[derive(Debug, Default)]
pub struct Args {
    pub vm: Option<String>,
    pub cpu: Option<u32>,
    pub json: bool,
    pub help: bool,
    pub list: bool,
    pub create: bool,
    pub mem_bytes: Option<u64>,
    pub destroy: bool,
    pub get_stats: bool,
    pub get_all: bool,
    pub gets: Vec<Get>,
    /// Register (or selector) name → value.
    pub sets: BTreeMap<&'static str, u64>,
    /// Segments or tables whose descriptor `--set-desc-X` sets from the desc-* values.
    pub set_descs: Vec<&'static str>,
    pub desc_base: Option<u64>,
    pub desc_limit: Option<u64>,
    pub desc_access: Option<u64>,
    pub pause: bool,
    pub resume: bool,
    pub inject_nmi: bool,
    pub force_reset: bool,
    pub force_poweroff: bool,
    /// `--checkpoint=FILE` or `--suspend=FILE` (then `suspend`).
    pub checkpoint: Option<std::path::PathBuf>,
    pub suspend: bool,
}

impl Args {
    /// Whether anything needs the running VM's control socket.
    pub fn needs_socket(&self) -> bool {
        self.get_stats
            || self.get_all
            || !self.gets.is_empty()
            || !self.sets.is_empty()
            || !self.set_descs.is_empty()
            || self.pause
            || self.resume
            || self.inject_nmi
            || self.force_reset
            || self.force_poweroff
            || self.checkpoint.is_some()
    }
}

/// A number as strtoul(3) with base 0 takes it: 0x hex, leading-0 octal, else decimal.
pub fn number(opt: &str, s: &str) -> Result<u64, String> {
    let t = s.trim();
    let r = if let Some(h) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        u64::from_str_radix(h, 16)
    } else if t.len() > 1 && t.starts_with('0') {
        u64::from_str_radix(&t[1..], 8)
    } else {
        t.parse()
    };
    r.map_err(|_| format!("--{opt}: {s:?} is not a number"))
}

/// A memory size: megabytes (as bhyvectl --set-mem), or with a K/M/G/T suffix.
fn mem_size(s: &str) -> Result<u64, String> {
    let bad = || format!("--set-mem: {s:?} is not a size (e.g. 256, 256M, 1G)");
    let (digits, unit) = match s.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => (&s[..i], &s[i..]),
        None => (s, "M"),
    };
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let shift = match unit {
        "K" | "k" => 10,
        "M" | "m" => 20,
        "G" | "g" => 30,
        "T" | "t" => 40,
        _ => return Err(bad()),
    };
    n.checked_mul(1 << shift).filter(|&b| b > 0).ok_or_else(bad)
}

fn lookup(table: &'static [&'static str], name: &str) -> Option<&'static str> {
    table.iter().copied().find(|n| *n == name)
}

/// Parses the arguments (without the program name).
pub fn parse(argv: &[String]) -> Result<Args, String> {
    let mut a = Args::default();
    let mut it = argv.iter().peekable();
    while let Some(arg) = it.next() {
        if arg == "-h" {
            a.help = true;
            continue;
        }
        let Some(body) = arg.strip_prefix("--") else {
            return Err(format!(
                "{arg}: unexpected argument (options are --name[=value])"
            ));
        };
        let (opt, inline) = match body.split_once('=') {
            Some((o, v)) => (o, Some(v.to_string())),
            None => (body, None),
        };
        // Options that take a value accept `--opt=V` and `--opt V`.
        let takes_value = matches!(
            opt,
            "vm" | "cpu"
                | "set-mem"
                | "desc-base"
                | "desc-limit"
                | "desc-access"
                | "checkpoint"
                | "suspend"
        ) || (opt.starts_with("set-") && !opt.starts_with("set-desc-"));
        let value = if takes_value {
            match inline {
                Some(v) => Some(v),
                None => Some(
                    it.next()
                        .cloned()
                        .ok_or_else(|| format!("--{opt}: needs a value (--{opt}=VALUE)"))?,
                ),
            }
        } else {
            if inline.is_some() {
                return Err(format!("--{opt}: takes no value"));
            }
            None
        };
        let val = || value.clone().unwrap_or_default();
        match opt {
            "help" => a.help = true,
            "vm" => {
                let v = val();
                if v.is_empty() {
                    return Err("--vm: needs a VM name".into());
                }
                a.vm = Some(v);
            }
            "cpu" => {
                let n = number(opt, &val())?;
                a.cpu = Some(u32::try_from(n).map_err(|_| format!("--cpu: {n} is too large"))?);
            }
            "json" => a.json = true,
            "list" => a.list = true,
            "create" => a.create = true,
            "set-mem" => a.mem_bytes = Some(mem_size(&val())?),
            "destroy" => a.destroy = true,
            "get-stats" => a.get_stats = true,
            "get-all" => a.get_all = true,
            "pause" => a.pause = true,
            "resume" => a.resume = true,
            "inject-nmi" => a.inject_nmi = true,
            "force-reset" => a.force_reset = true,
            "force-poweroff" => a.force_poweroff = true,
            "checkpoint" | "suspend" => {
                let v = val();
                if v.is_empty() {
                    return Err(format!("--{opt}: needs a FILE"));
                }
                if a.checkpoint.is_some() {
                    return Err(format!("--{opt}: give one --checkpoint or --suspend"));
                }
                a.checkpoint = Some(v.into());
                a.suspend = opt == "suspend";
            }
            "desc-base" => a.desc_base = Some(number(opt, &val())?),
            "desc-limit" => a.desc_limit = Some(number(opt, &val())?),
            "desc-access" => a.desc_access = Some(number(opt, &val())?),
            _ => {
                if let Some(r) = opt.strip_prefix("get-desc-") {
                    let n = lookup(SEGMENTS, r)
                        .or_else(|| lookup(TABLES, r))
                        .ok_or_else(|| format!("--{opt}: unknown option"))?;
                    a.gets.push(Get::Desc(n));
                } else if let Some(r) = opt.strip_prefix("set-desc-") {
                    let n = lookup(SEGMENTS, r)
                        .or_else(|| lookup(TABLES, r))
                        .ok_or_else(|| format!("--{opt}: unknown option"))?;
                    a.set_descs.push(n);
                } else if let Some(r) = opt.strip_prefix("get-") {
                    let n = lookup(GPRS, r)
                        .or_else(|| lookup(CONTROL, r))
                        .or_else(|| lookup(DEBUG, r))
                        .or_else(|| lookup(SEGMENTS, r))
                        .ok_or_else(|| format!("--{opt}: unknown option"))?;
                    a.gets.push(Get::Reg(n));
                } else if let Some(r) = opt.strip_prefix("set-") {
                    let n = lookup(GPRS, r)
                        .or_else(|| lookup(CONTROL, r))
                        .or_else(|| lookup(DEBUG, r))
                        .or_else(|| lookup(SEGMENTS, r))
                        .ok_or_else(|| format!("--{opt}: unknown option"))?;
                    a.sets.insert(n, number(opt, &val())?);
                } else {
                    return Err(format!("--{opt}: unknown option"));
                }
            }
        }
    }
    if a.help {
        return Ok(a);
    }
    if a.list {
        if a.vm.is_some() || a.create || a.destroy || a.needs_socket() {
            return Err("--list: takes no --vm and no other action".into());
        }
        return Ok(a);
    }
    if a.vm.is_none() {
        return Err("--vm=NAME is required (or --list)".into());
    }
    if !a.create && !a.destroy && !a.needs_socket() {
        return Err("nothing to do: give an action such as --get-all or --get-stats".into());
    }
    if a.mem_bytes.is_some() && !a.create {
        return Err("--set-mem: only with --create".into());
    }
    if a.suspend && (a.force_reset || a.force_poweroff) {
        return Err("--suspend: the VM stops after it; no --force-reset/--force-poweroff".into());
    }
    if a.force_reset && a.force_poweroff {
        return Err("--force-reset and --force-poweroff: give one of them".into());
    }
    if !a.set_descs.is_empty()
        && a.desc_base.is_none()
        && a.desc_limit.is_none()
        && a.desc_access.is_none()
    {
        return Err("--set-desc-*: give --desc-base, --desc-limit and/or --desc-access".into());
    }
    Ok(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &[&str]) -> Result<Args, String> {
        parse(&args.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn bhyvectl_style_options() {
        let a = p(&[
            "--vm=vm0",
            "--cpu",
            "1",
            "--get-rip",
            "--get-desc-cs",
            "--get-cs",
        ])
        .unwrap();
        assert_eq!(a.vm.as_deref(), Some("vm0"));
        assert_eq!(a.cpu, Some(1));
        assert_eq!(a.gets, [Get::Reg("rip"), Get::Desc("cs"), Get::Reg("cs")]);
        let a = p(&[
            "--vm",
            "x",
            "--set-rip=0x1000",
            "--set-rax",
            "010",
            "--pause",
        ])
        .unwrap();
        assert_eq!(a.sets.get("rip"), Some(&0x1000));
        assert_eq!(a.sets.get("rax"), Some(&8));
        let a = p(&["--vm=x", "--get-dr7", "--set-dr0=1"]).unwrap();
        assert_eq!(a.gets, [Get::Reg("dr7")]);
        assert_eq!(a.sets.get("dr0"), Some(&1));
        let a = p(&["--vm=x", "--create", "--set-mem=1G"]).unwrap();
        assert_eq!(a.mem_bytes, Some(1 << 30));
        let a = p(&["--vm=x", "--create", "--set-mem=128"]).unwrap();
        assert_eq!(a.mem_bytes, Some(128 << 20));
        assert!(p(&["--list", "--json"]).unwrap().list);
    }

    #[test]
    fn bad_input_names_the_option() {
        let e = |args: &[&str]| p(args).unwrap_err();
        assert!(e(&["--vm=x", "--get-rpi"]).starts_with("--get-rpi:"));
        assert!(e(&["--vm=x", "--set-rip=zz"]).starts_with("--set-rip:"));
        assert!(e(&["--vm=x", "--set-rip"]).starts_with("--set-rip:"));
        assert!(e(&["--get-rip"]).contains("--vm"));
        assert!(e(&["--vm=x"]).contains("nothing to do"));
        assert!(e(&["--vm=x", "--get-all=1"]).contains("takes no value"));
        assert!(e(&["vm0"]).contains("unexpected argument"));
        assert!(e(&["--list", "--vm=x"]).starts_with("--list"));
        assert!(e(&["--vm=x", "--set-mem=5X", "--create"]).starts_with("--set-mem"));
        assert!(e(&["--vm=x", "--set-desc-cs"]).contains("--desc-base"));
        assert!(e(&["--vm=x", "--force-reset", "--force-poweroff"]).contains("one of"));
        assert!(e(&["--vm=x", "--checkpoint="]).starts_with("--checkpoint: needs"));
        assert!(e(&["--vm=x", "--checkpoint=a", "--suspend=b"]).starts_with("--suspend"));
        let a = p(&["--vm=x", "--suspend", "snap"]).unwrap();
        assert!(a.suspend && a.checkpoint.as_deref() == Some(std::path::Path::new("snap")));
    }
}

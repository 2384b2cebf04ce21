//! bhyve(8)'s command line, turned into configuration keys (bhyve_config(5)).

use vmm::config::{ConfigError, ConfigTree};

/// What the command line asks for.
#[derive(Debug)]
pub enum Command {
    Run(ConfigTree),
    Help,
    EmulationHelp,
    LpcHelp,
    Version,
}

fn err<T>(msg: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError(msg.into()))
}

/// Short flags without an argument, and the key each sets.
const FLAGS: &[(char, &str, &str)] = &[
    ('A', "acpi_tables", "true"),
    ('a', "x86.x2apic", "false"),
    ('C', "memory.guest_in_core", "true"),
    ('D', "destroy_on_poweroff", "true"),
    ('e', "x86.strictio", "true"),
    ('H', "x86.vmexit_on_hlt", "true"),
    ('P', "x86.vmexit_on_pause", "true"),
    ('S', "memory.wired", "true"),
    ('u', "rtc.use_localtime", "false"),
    ('W', "virtio_msix", "false"),
    ('w', "x86.strictmsr", "false"),
    ('x', "x86.x2apic", "true"),
    ('Y', "x86.mptable", "false"),
];

/// Short options taking an argument.
const WITH_ARG: &str = "cfGkKlmoprsU";

/// Parses argv (without the program name).
pub fn parse(args: &[String]) -> Result<Command, ConfigError> {
    let mut tree = ConfigTree::default();
    let mut name = None;
    let mut i = 0;
    let next = |i: &mut usize, what: &str| -> Result<String, ConfigError> {
        *i += 1;
        args.get(*i)
            .cloned()
            .ok_or_else(|| ConfigError(format!("{what}: missing argument")))
    };
    while i < args.len() {
        let arg = &args[i];
        if let Some(long) = arg.strip_prefix("--") {
            let (opt, inline) = match long.split_once('=') {
                Some((o, v)) => (o, Some(v.to_string())),
                None => (long, None),
            };
            let mut value = |what: &str| match &inline {
                Some(v) => Ok(v.clone()),
                None => next(&mut i, what),
            };
            match opt {
                "help" => return Ok(Command::Help),
                "version" => return Ok(Command::Version),
                "kernel" => tree.set("boot.kernel", &value("--kernel")?),
                "initrd" => tree.set("boot.initrd", &value("--initrd")?),
                "append" | "cmdline" => tree.set("boot.cmdline", &value("--append")?),
                "" => {
                    // `--` ends options; the VM name follows.
                    i += 1;
                    if let Some(n) = args.get(i) {
                        set_name(&mut name, n)?;
                    }
                    i += 1;
                    continue;
                }
                other => return err(format!("--{other}: unknown option (see rhyve --help)")),
            }
        } else if arg.len() > 1 && arg.starts_with('-') {
            let chars: Vec<char> = arg.chars().skip(1).collect();
            let mut j = 0;
            while j < chars.len() {
                let c = chars[j];
                if let Some((_, key, value)) = FLAGS.iter().find(|f| f.0 == c) {
                    tree.set(key, value);
                } else if c == 'h' {
                    return Ok(Command::Help);
                } else if WITH_ARG.contains(c) {
                    let rest: String = chars[j + 1..].iter().collect();
                    let optarg = if rest.is_empty() {
                        next(&mut i, &format!("-{c}"))?
                    } else {
                        rest
                    };
                    match short_with_arg(&mut tree, c, &optarg)? {
                        Some(cmd) => return Ok(cmd),
                        None => break,
                    }
                } else {
                    return err(format!("-{c}: unknown option (see rhyve --help)"));
                }
                j += 1;
            }
        } else {
            set_name(&mut name, arg)?;
        }
        i += 1;
    }
    match name {
        Some(n) => tree.set("name", &n),
        None if tree.get("name").is_some() => {}
        None => return err("missing VM name (the last argument; see rhyve --help)"),
    }
    Ok(Command::Run(tree))
}

fn set_name(name: &mut Option<String>, arg: &str) -> Result<(), ConfigError> {
    if let Some(prev) = name {
        return err(format!(
            "{arg}: unexpected argument (the VM name is already {prev:?})"
        ));
    }
    *name = Some(arg.to_string());
    Ok(())
}

fn short_with_arg(t: &mut ConfigTree, c: char, v: &str) -> Result<Option<Command>, ConfigError> {
    match c {
        'c' => parse_cpus(t, v)?,
        'm' => {
            crate::config::parse_size(v)?;
            t.set("memory.size", v);
        }
        'o' => t.set_assignment("-o", v)?,
        'k' => t.load_file(v)?,
        's' if v == "help" => return Ok(Some(Command::EmulationHelp)),
        's' => parse_slot(t, v)?,
        'l' if v == "help" => return Ok(Some(Command::LpcHelp)),
        'l' => parse_lpc(t, v)?,
        'p' => {
            let (vcpu, host) = v
                .split_once(':')
                .ok_or_else(|| ConfigError(format!("-p {v}: expected vcpu:hostcpu")))?;
            let (vcpu, host) = (vcpu.parse::<u32>(), host.parse::<usize>());
            let (Ok(vcpu), Ok(host)) = (vcpu, host) else {
                return err(format!("-p {v}: expected vcpu:hostcpu"));
            };
            let key = format!("vcpu.{vcpu}.cpuset");
            let list = match t.get(&key) {
                Some(prev) => format!("{prev},{host}"),
                None => host.to_string(),
            };
            t.set(&key, &list);
        }
        'U' => t.set("uuid", v),
        'f' => {
            crate::config::parse_fw_cfg_file(v)?;
            // Numbered in command-line order (the tree is sorted by key).
            let n = t.children("fwcfg").count();
            t.set(&format!("fwcfg.{n:04}"), v);
        }
        'G' => return err(format!("-G {v}: the gdb stub is not supported yet")),
        'K' => return err(format!("-K {v}: keyboard layouts are not supported yet")),
        'r' => t.set("restore.file", v),
        _ => return err(format!("-{c}: unknown option")),
    }
    Ok(None)
}

/// `-c [[cpus=]n][,sockets=n][,cores=n][,threads=n]`
fn parse_cpus(t: &mut ConfigTree, v: &str) -> Result<(), ConfigError> {
    for (n, part) in v.split(',').enumerate() {
        let (key, value) = match part.split_once('=') {
            Some((k @ ("cpus" | "sockets" | "cores" | "threads"), val)) => (k, val),
            Some((k, _)) => return err(format!("-c {v}: unknown topology key '{k}'")),
            None if n == 0 => ("cpus", part),
            None => return err(format!("-c {v}: expected key=value after the CPU count")),
        };
        if value.parse::<u32>().ok().filter(|x| *x > 0).is_none() {
            return err(format!("-c {v}: '{value}' is not a positive number"));
        }
        t.set(key, value);
    }
    Ok(())
}

/// `slot`, `slot:func` or `bus:slot:func` (decimal), as bhyve(8).
pub fn parse_pci_address(s: &str) -> Option<(u8, u8, u8)> {
    let nums: Vec<u32> = s
        .split(':')
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    let (b, d, f) = match nums.as_slice() {
        [d] => (0, *d, 0),
        [d, f] => (0, *d, *f),
        [b, d, f] => (*b, *d, *f),
        _ => return None,
    };
    (b <= 255 && d <= 31 && f <= 7).then_some((b as u8, d as u8, f as u8))
}

/// `-s slot,emulation[,conf]`
fn parse_slot(t: &mut ConfigTree, v: &str) -> Result<(), ConfigError> {
    let mut parts = v.splitn(3, ',');
    let slot = parts.next().unwrap_or("");
    let emulation = parts
        .next()
        .filter(|e| !e.is_empty())
        .ok_or_else(|| ConfigError(format!("-s {v}: expected slot,emulation[,conf]")))?;
    let (b, d, f) = parse_pci_address(slot).ok_or_else(|| {
        ConfigError(format!(
            "-s {v}: invalid slot '{slot}' (slot 0-31, function 0-7, bus 0-255)"
        ))
    })?;
    if crate::emulations::find(emulation).is_none() {
        return err(format!(
            "-s {v}: unknown emulation '{emulation}' (rhyve -s help lists them)"
        ));
    }
    let prefix = format!("pci.{b}.{d}.{f}");
    if let Some(prev) = t.get(&format!("{prefix}.device")) {
        return err(format!(
            "-s {v}: slot {b}:{d}:{f} is already used by {prev}"
        ));
    }
    t.set(&format!("{prefix}.device"), emulation);
    if let Some(conf) = parts.next() {
        // bhyve's legacy option string: a bare first word is the backend path.
        for (n, opt) in conf.split(',').enumerate() {
            match opt.split_once('=') {
                Some((k, val)) => t.set(&format!("{prefix}.{k}"), val),
                None if n == 0 => t.set(&format!("{prefix}.path"), opt),
                None => t.set(&format!("{prefix}.{opt}"), "true"),
            }
        }
    }
    Ok(())
}

/// `-l lpcdev[,conf]`
fn parse_lpc(t: &mut ConfigTree, v: &str) -> Result<(), ConfigError> {
    let (dev, conf) = match v.split_once(',') {
        Some((d, c)) => (d, Some(c)),
        None => (v, None),
    };
    match (dev.to_ascii_lowercase().as_str(), conf) {
        (d @ ("com1" | "com2" | "com3" | "com4"), Some(backend)) if !backend.is_empty() => {
            t.set(&format!("lpc.{d}.path"), backend);
        }
        ("com1" | "com2" | "com3" | "com4", _) => {
            return err(format!("-l {v}: expected comN,backend (e.g. com1,stdio)"))
        }
        ("pc-testdev", None) => t.set("lpc.pc-testdev", "true"),
        ("bootrom", Some(files)) if !files.is_empty() => {
            let (rom, vars) = match files.split_once(',') {
                Some((r, v)) => (r, Some(v)),
                None => (files, None),
            };
            if rom.is_empty() || vars.is_some_and(str::is_empty) {
                return err(format!("-l {v}: expected bootrom,ROMFILE[,VARSFILE]"));
            }
            t.set("lpc.bootrom", rom);
            if let Some(vars) = vars {
                t.set("lpc.bootvars", vars);
            }
        }
        ("bootrom", _) => return err(format!("-l {v}: expected bootrom,ROMFILE[,VARSFILE]")),
        ("debugcon", Some(path)) if !path.is_empty() => t.set("lpc.debugcon.path", path),
        ("debugcon", _) => return err(format!("-l {v}: expected debugcon,PATH")),
        // bhyve's `-l fwcfg,qemu`, the same as `-o lpc.fwcfg=qemu`.
        ("fwcfg", Some(kind)) => t.set("lpc.fwcfg", kind),
        ("tpm", _) => return err(format!("-l {v}: '{dev}' is not supported yet")),
        _ => {
            return err(format!(
                "-l {v}: unknown LPC device '{dev}' (rhyve -l help lists them)"
            ))
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &str) -> Result<ConfigTree, ConfigError> {
        let v: Vec<String> = args.split_whitespace().map(String::from).collect();
        match parse(&v)? {
            Command::Run(t) => Ok(t),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_readme_command_line() {
        let t = run("-c 2 -m 512M -s 0,hostbridge -s 31,lpc -l com1,stdio -AHP vm0").unwrap();
        assert_eq!(t.get("cpus"), Some("2"));
        assert_eq!(t.get("memory.size"), Some("512M"));
        assert_eq!(t.get("pci.0.0.0.device"), Some("hostbridge"));
        assert_eq!(t.get("pci.0.31.0.device"), Some("lpc"));
        assert_eq!(t.get("lpc.com1.path"), Some("stdio"));
        assert_eq!(t.get("acpi_tables"), Some("true"));
        assert_eq!(t.get("x86.vmexit_on_pause"), Some("true"));
        assert_eq!(t.get("name"), Some("vm0"));
    }

    #[test]
    fn attached_arguments_and_long_options() {
        let t = run("-m1G -c4,sockets=2,cores=2 --kernel=/k --initrd /i --append x vm1").unwrap();
        assert_eq!(t.get("memory.size"), Some("1G"));
        assert_eq!(t.get("sockets"), Some("2"));
        assert_eq!(t.get("boot.kernel"), Some("/k"));
        assert_eq!(t.get("boot.initrd"), Some("/i"));
        assert_eq!(t.get("boot.cmdline"), Some("x"));
    }

    #[test]
    fn slots() {
        assert_eq!(parse_pci_address("2"), Some((0, 2, 0)));
        assert_eq!(parse_pci_address("2:3"), Some((0, 2, 3)));
        assert_eq!(parse_pci_address("1:2:3"), Some((1, 2, 3)));
        for bad in ["32", "0:8", "256:0:0", "a", "", "1:2:3:4", "-1"] {
            assert_eq!(parse_pci_address(bad), None, "{bad}");
        }
        let e = run("-s 0,hostbridge -s 0:0,lpc vm0")
            .unwrap_err()
            .to_string();
        assert!(e.contains("already used"), "{e}");
        let e = run("-s 3,virtio-frob vm0").unwrap_err().to_string();
        assert!(e.contains("virtio-frob"), "{e}");
    }

    #[test]
    fn errors_name_the_argument() {
        for (args, needle) in [
            ("-m 12Q vm0", "-m 12Q"),
            ("-c 0 vm0", "-c 0"),
            ("-c 2,dies=1 vm0", "dies"),
            ("-l com5,stdio vm0", "com5"),
            ("-l com1 vm0", "com1"),
            ("-Z vm0", "-Z"),
            ("--frob vm0", "--frob"),
            ("-o novalue vm0", "novalue"),
            ("-p 1 vm0", "-p 1"),
            ("-m", "-m"),
            ("-c 1", "missing VM name"),
            ("vm0 vm1", "vm1"),
        ] {
            let e = run(args).unwrap_err().to_string();
            assert!(e.contains(needle), "{args}: {e}");
        }
    }

    #[test]
    fn help_forms() {
        let p =
            |s: &str| parse(&s.split_whitespace().map(String::from).collect::<Vec<_>>()).unwrap();
        assert!(matches!(p("-s help"), Command::EmulationHelp));
        assert!(matches!(p("-l help"), Command::LpcHelp));
        assert!(matches!(p("-h"), Command::Help));
        assert!(matches!(p("--help"), Command::Help));
    }
}

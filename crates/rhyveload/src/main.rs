//! rhyveload: bhyveload(8) for rhyve. Finds a Linux kernel, initrd and command line in a
//! disk image (`-d`) or host directory (`-h`), loads them into the guest RAM of the named VM
//! object (creating it, or reusing an idle one of the same size: the reboot loop), leaves
//! the boot vCPU's state in the object's `boot-state` and exits; `rhyve vmname` then runs it.

use std::path::PathBuf;

use loader::{BootBytes, BootState};
use vmm::memsize;
use vmmapi::{GuestRam, VmObject};

/// Appended to command-line errors, which stay on one line.
const SEE_HELP: &str = " (rhyveload --help)";

const HELP: &str = "\
NAME
     rhyveload - load a Linux guest into a rhyve virtual machine (bhyveload(8))

SYNOPSIS
     rhyveload [-CS] [-c cons-dev] [-d disk-path] [-e name=value] [-h host-path]
               [-m memsize[K|k|M|m|G|g|T|t]] vmname

DESCRIPTION
     rhyveload finds what to boot in the guest's boot disk or a host directory (Boot Loader
     Specification entries, grub.cfg, extlinux.conf, or Debian's /vmlinuz and /initrd.img
     symlinks), loads kernel, initrd and command line into the guest memory of the VM object
     vmname, records the boot vCPU's state in RUNDIR/vmname/boot-state, prints what it
     chose and exits. `rhyve vmname` (without --kernel) then runs the loaded guest.

     The VM object is created if it does not exist. An existing idle object is reused (its
     memory cleared) when its memory size matches, which makes the bhyve reboot loop work:
         while rhyveload -m 1G -d disk.img vm0 && rhyve -m 1G ... vm0; do :; done
     rhyve consumes the boot-state, so after a guest reboot rhyveload must run again.

     -d disk-path   The boot disk: raw image, block device or qcow2 image. May be given
                    more than once; the first disk with something bootable wins.
     -h host-path   The top of the guest's boot filesystem, as a host directory.
     -e name=value  entry=TITLE|ID|INDEX picks a boot entry, cmdline=... replaces its
                    command line; other names are recorded in the boot-state.
     -m memsize     Guest memory, as rhyve -m (no suffix: MiB). Default: the existing
                    object's size, else 256M.
     -c cons-dev    Accepted for compatibility: rhyveload has no interactive loader menu,
                    so it needs no console (use -e entry= to choose).
     -C             Accepted for compatibility: guest memory is always a file
                    (RUNDIR/vmname/memory), so no core dump needs to include it.
     -S             Accepted for compatibility (memory is not wired).
     -l os-loader   Not supported: rhyveload is its own Linux loader.

ENVIRONMENT
     RHYVE_RUNDIR   Runtime directory base (default /run/rhyve).

EXIT STATUS
     0 loaded; 1 error (one line on stderr).";

/// The command line.
#[derive(Debug, Default, PartialEq, Eq)]
struct Args {
    memory: Option<u64>,
    disks: Vec<PathBuf>,
    host: Option<PathBuf>,
    env: Vec<(String, String)>,
    console: Option<String>,
    name: String,
}

enum Command {
    Help,
    Load(Args),
}

/// getopt(3)-style: `-m 1G` or `-m1G`, flags may be combined (`-CS`), `--` ends options.
fn parse(argv: &[String]) -> Result<Command, String> {
    let mut a = Args::default();
    let mut names = Vec::new();
    let mut it = argv.iter();
    while let Some(arg) = it.next() {
        if arg == "--" {
            names.extend(it.by_ref().cloned());
            break;
        }
        if arg == "--help" {
            return Ok(Command::Help);
        }
        let Some(flags) = arg.strip_prefix('-').filter(|f| !f.is_empty()) else {
            names.push(arg.clone());
            continue;
        };
        for (i, c) in flags.char_indices() {
            match c {
                'C' | 'S' => continue,
                'c' | 'd' | 'e' | 'h' | 'm' | 'l' => {}
                _ => return Err(format!("-{c}: unknown option{SEE_HELP}")),
            }
            let rest = &flags[i + c.len_utf8()..];
            let value = if rest.is_empty() {
                it.next()
                    .cloned()
                    .ok_or_else(|| format!("-{c}: needs a value{SEE_HELP}"))?
            } else {
                rest.to_string()
            };
            match c {
                'c' => a.console = Some(value),
                'd' => a.disks.push(PathBuf::from(value)),
                'h' => a.host = Some(PathBuf::from(value)),
                'e' => {
                    let (k, v) = value
                        .split_once('=')
                        .filter(|(k, _)| !k.is_empty())
                        .ok_or_else(|| format!("-e {value}: expected name=value"))?;
                    a.env.push((k.to_string(), v.to_string()));
                }
                'm' => {
                    let m = memsize::parse(&value).ok_or_else(|| {
                        format!("-m {value}: invalid memory size (use e.g. 512M, 2G)")
                    })?;
                    if !(memsize::MIN..=memsize::MAX).contains(&m) {
                        return Err(format!(
                            "-m {value}: memory size is outside {}..{}",
                            memsize::show(memsize::MIN),
                            memsize::show(memsize::MAX)
                        ));
                    }
                    a.memory = Some(m);
                }
                'l' => {
                    return Err(format!(
                    "-l {value}: other OS loaders are not supported (rhyveload loads Linux itself)"
                ))
                }
                _ => unreachable!("filtered above"),
            }
            break;
        }
    }
    match names.len() {
        0 => Err(format!("missing vmname{SEE_HELP}")),
        1 => {
            a.name = names.remove(0);
            if !vmmapi::valid_vm_name(&a.name) {
                return Err(format!(
                    "invalid VM name {:?}: use letters, digits, '-', '_', '.'",
                    a.name
                ));
            }
            if a.disks.is_empty() && a.host.is_none() {
                return Err(format!(
                    "nothing to load from: give -d disk-path or -h host-path{SEE_HELP}"
                ));
            }
            if !a.disks.is_empty() && a.host.is_some() {
                return Err("give -d disk-path or -h host-path, not both".into());
            }
            Ok(Command::Load(a))
        }
        _ => Err(format!(
            "one vmname expected, got {}{SEE_HELP}",
            names.join(" ")
        )),
    }
}

/// `DebianSymlinks` → `debian-symlinks`.
fn source_name(s: &bootdisk::BootSource) -> String {
    let mut out = String::new();
    for (i, c) in format!("{s:?}").chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('-');
        }
        out.push(c.to_ascii_lowercase());
    }
    out
}

/// Finds what to boot: the first disk that has something, else the first disk's error.
fn choose(a: &Args, ram: u64) -> Result<(bootdisk::BootSelection, String), String> {
    let env = |k: &str| {
        a.env
            .iter()
            .rev()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
    };
    let opts = bootdisk::Options {
        entry: env("entry"),
        cmdline: env("cmdline"),
        // Kernel and initrd must fit in guest RAM anyway.
        max_file_bytes: ram,
    };
    if let Some(h) = &a.host {
        return bootdisk::find_boot_in_dir(h, &opts)
            .map(|s| (s, h.display().to_string()))
            .map_err(|e| format!("-h {}: {e}", h.display()));
    }
    let mut first_err = None;
    for d in &a.disks {
        match bootdisk::find_boot_in_image(d, &opts) {
            Ok(s) => return Ok((s, d.display().to_string())),
            Err(e) => {
                first_err.get_or_insert_with(|| format!("-d {}: {e}", d.display()));
            }
        }
    }
    Err(first_err.unwrap_or_else(|| "no disk given".into()))
}

/// Creates the object, or reuses an idle one of the same size. Returns it and whether it
/// was created now (then a failed load removes it again).
fn object_for(a: &Args) -> Result<(VmObject, bool), String> {
    let want = a.memory.unwrap_or(256 << 20);
    match VmObject::create(&a.name, want) {
        Ok(o) => Ok((o, true)),
        Err(vmmapi::Error::Exists(_)) => {
            let o = VmObject::open(&a.name).map_err(|e| e.to_string())?;
            if a.memory.is_some_and(|m| m != o.ram_bytes()) {
                return Err(format!(
                    "-m {}: VM {} exists with {} of memory; destroy it first (rhyvectl --vm={} --destroy)",
                    memsize::show(want),
                    a.name,
                    memsize::show(o.ram_bytes()),
                    a.name
                ));
            }
            o.clear_boot_state().map_err(|e| e.to_string())?;
            o.clear_memory().map_err(|e| e.to_string())?;
            Ok((o, false))
        }
        Err(e) => Err(e.to_string()),
    }
}

fn load(a: &Args) -> Result<String, String> {
    if let Some(c) = &a.console {
        if c != "stdio" && !std::path::Path::new(c).exists() {
            return Err(format!("-c {c}: no such device"));
        }
    }
    // Find the kernel first: a bad image must not leave an object behind.
    let ram_hint = a
        .memory
        .or_else(|| {
            let objects = vmmapi::list().ok()?;
            objects.into_iter().find(|o| o.name == a.name)?.ram_bytes
        })
        .unwrap_or(256 << 20);
    let (sel, from) = choose(a, ram_hint)?;
    let (obj, created) = object_for(a)?;
    let result = fill(a, &obj, &sel, &from);
    if result.is_err() && created {
        obj.remove_on_drop();
    }
    result
}

/// Loads `sel` into the object's RAM and writes its boot-state; returns the report.
fn fill(
    a: &Args,
    obj: &VmObject,
    sel: &bootdisk::BootSelection,
    from: &str,
) -> Result<String, String> {
    let ram_bytes = obj.ram_bytes();
    let file = obj.memory_file().map_err(|e| e.to_string())?;
    // Huge pages where the object's filesystem offers them: what is loaded now is what the
    // guest touches first.
    let regions = loader::layout::ram_regions(ram_bytes);
    let ram = GuestRam::new(&file, &regions, &Default::default()).map_err(|e| e.to_string())?;
    // rhyve builds its ACPI tables at this fixed address when it adopts the object.
    let rsdp = loader::acpi::ACPI_START;
    let loaded = loader::load_bytes(
        ram.memory(),
        &BootBytes {
            kernel: &sel.kernel,
            kernel_name: &sel.kernel_path,
            initrd: match (&sel.initrd_path, &sel.initrd) {
                (Some(p), Some(b)) => Some((p.as_str(), b.as_slice())),
                (None, Some(b)) => Some(("initrd", b.as_slice())),
                _ => None,
            },
            cmdline: &sel.cmdline,
            ram_bytes,
            rsdp_addr: Some(rsdp),
        },
    )
    .map_err(|e| format!("{from}: {e}"))?;
    let state = BootState {
        ram_bytes,
        format: loaded.format,
        entry: loaded.entry,
        source: source_name(&sel.source),
        title: sel.title.clone(),
        kernel: sel.kernel_path.clone(),
        initrd: sel.initrd.as_ref().map(|_| {
            sel.initrd_path
                .clone()
                .unwrap_or_else(|| "initrd".to_string())
        }),
        cmdline: sel.cmdline.clone(),
        rsdp_addr: Some(rsdp),
        env: a
            .env
            .iter()
            .filter(|(k, _)| k != "entry" && k != "cmdline")
            .cloned()
            .collect(),
    };
    obj.write_boot_state(&state.to_text())
        .map_err(|e| e.to_string())?;
    let mut out = format!(
        "vm: {}\nmemory: {}\nfrom: {from}\nsource: {}\n",
        a.name,
        memsize::show(ram_bytes),
        state.source
    );
    if let Some(t) = &state.title {
        out.push_str(&format!("title: {t}\n"));
    }
    out.push_str(&format!(
        "kernel: {}\ninitrd: {}\ncmdline: {}\n",
        state.kernel,
        state.initrd.as_deref().unwrap_or("none"),
        state.cmdline
    ));
    Ok(out)
}

fn main() {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let code = match parse(&argv) {
        Ok(Command::Help) => {
            println!("{HELP}");
            0
        }
        Ok(Command::Load(a)) => match load(&a) {
            Ok(report) => {
                print!("{report}");
                0
            }
            Err(e) => {
                eprintln!("rhyveload: {e}");
                1
            }
        },
        Err(e) => {
            eprintln!("rhyveload: {e}");
            1
        }
    };
    std::process::exit(code);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &[&str]) -> Result<Args, String> {
        let v: Vec<String> = s.iter().map(|x| x.to_string()).collect();
        match parse(&v)? {
            Command::Load(a) => Ok(a),
            Command::Help => Err("help".into()),
        }
    }

    #[test]
    fn options() {
        let a = args(&[
            "-CS",
            "-m128M",
            "-d",
            "a.img",
            "-d",
            "b.qcow2",
            "-e",
            "entry=2",
            "-ecmdline=x=y z",
            "-c",
            "stdio",
            "vm0",
        ])
        .unwrap();
        assert_eq!(a.memory, Some(128 << 20));
        assert_eq!(a.disks, [PathBuf::from("a.img"), PathBuf::from("b.qcow2")]);
        assert_eq!(
            a.env,
            [
                ("entry".to_string(), "2".to_string()),
                ("cmdline".to_string(), "x=y z".to_string())
            ]
        );
        assert_eq!(
            (a.console.as_deref(), a.name.as_str()),
            (Some("stdio"), "vm0")
        );
        let a = args(&["-h", "/srv/root", "-m", "1G", "vm1"]).unwrap();
        assert_eq!(
            (a.host, a.memory),
            (Some("/srv/root".into()), Some(1 << 30))
        );
    }

    #[test]
    fn bad_command_lines_name_the_argument() {
        for (argv, want) in [
            (&["-m", "12Q", "-d", "x", "vm"][..], "-m 12Q"),
            (
                &["-m", "1M", "-d", "x", "vm"][..],
                "-m 1M: memory size is outside 16M..511G",
            ),
            (&["-d", "x"][..], "missing vmname"),
            (&["-d", "x", "a", "b"][..], "one vmname expected"),
            (&["vm"][..], "nothing to load from"),
            (
                &["-d", "x", "-h", "y", "vm"][..],
                "give -d disk-path or -h host-path, not both",
            ),
            (&["-e", "novalue", "-d", "x", "vm"][..], "-e novalue"),
            (
                &["-l", "/boot/userboot.so", "-d", "x", "vm"][..],
                "-l /boot/userboot.so",
            ),
            (&["-x", "vm"][..], "-x: unknown option"),
            (&["-d"][..], "-d: needs a value"),
            (&["-d", "x", "../vm"][..], "invalid VM name"),
        ] {
            let e = args(argv).unwrap_err();
            assert!(e.starts_with(want), "{argv:?}: {e}");
        }
        assert!(matches!(parse(&["--help".to_string()]), Ok(Command::Help)));
    }

    #[test]
    fn source_names() {
        assert_eq!(source_name(&bootdisk::BootSource::Bls), "bls");
        assert_eq!(
            source_name(&bootdisk::BootSource::DebianSymlinks),
            "debian-symlinks"
        );
    }
}

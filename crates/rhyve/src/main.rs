//! rhyve: bhyve's userland hypervisor, on Linux KVM.

mod cli;
mod logger;

use std::time::Instant;

use cli::Command;
use vmm::{config, emulations, host_output, machine, terminal};

const HELP: &str = "\
NAME
     rhyve - run a guest operating system inside a virtual machine (bhyve on Linux/KVM)

SYNOPSIS
     rhyve [-AaCDeHhPSuWwxY] [-c [[cpus=]numcpus][,sockets=n][,cores=n][,threads=n]]
           [-f name,[string|file]=data] [-k config_file] [-l lpcdev[,conf]]
           [-m memsize[K|k|M|m|G|g|T|t]]
           [-o var=value] [-p vcpu:hostcpu] [-s slot,emulation[,conf]] [-U uuid]
           [--kernel path] [--initrd path] [--append cmdline] [-r file] vmname
     rhyve -l help
     rhyve -s help
     rhyve --api-sock PATH [--id ID] [--config-file FILE] ...   (Firecracker's mode)

DESCRIPTION
     Run as `firecracker`, or with --api-sock, --id, --config-file or --no-api, rhyve
     speaks Firecracker's command line and REST API instead (rhyve --api-sock X --help).

     rhyve runs the virtual machine vmname. The guest boots through a boot ROM
     (-l bootrom), or its Linux kernel is booted directly (bzImage or ELF vmlinux with a
     PVH note), no firmware involved: either --kernel, or, without it, what rhyveload(8)
     loaded into the VM object vmname (-m must match the object's size). rhyve consumes
     that load: after a guest reboot, run rhyveload again.

     -c [[cpus=]numcpus][,sockets=n][,cores=n][,threads=n]
             Number of guest vCPUs (default 1); if a topology is given, cpus must equal
             sockets * cores * threads.
     -m memsize[K|k|M|m|G|g|T|t]
             Guest memory; no suffix means megabytes. Default 256M.
     -s slot,emulation[,conf]
             Attach a PCI emulation; slot is slot, slot:function or bus:slot:function.
             rhyve -s help lists emulations.
     -l lpcdev[,conf]
             Configure an LPC device: com1..com4 with a backend, bootrom, fwcfg or
             pc-testdev.
             rhyve -l help lists them. Backends: stdio; a device path (e.g. /dev/ttyS1);
             pty (a new pty pair, its path printed on stderr as `rhyve: comN: /dev/pts/M`
             and written to RUNDIR/vmname/comN.pty); unix=PATH and tcp=IP:PORT (listen
             for one client at a time; IP must be loopback). Guest output nobody reads is
             dropped, so a console never stalls the guest.
     -l bootrom,romfile
             Boot through firmware (e.g. SeaBIOS's bios-256k.bin): romfile (a multiple of
             4 KiB, at most 16 MiB) is mapped read-only just below 4 GiB, its last 128 KiB
             also as RAM at 0xE0000-0xFFFFF; the boot vCPU starts at the reset vector.
             Implies QEMU's fw_cfg (ports 0x510-0x51b with DMA: RAM map, CPUs, ACPI
             tables through etc/table-loader, etc/sercon-port for COM1) and gives the
             hostbridge QEMU's i440FX identity (0x8086:0x1237, subsystem 0x1af4:0x1100),
             without ECAM; PCI BARs are the firmware's to assign. Excludes --kernel.
     -l debugcon,path
             QEMU's debug console at port 0x402 (firmware debug logs), appended to path.
     -l fwcfg,qemu|none
             Same as -o lpc.fwcfg=: QEMU's fw_cfg on or off (default: on with a bootrom).
     -f name,string=data | -f name,file=path
             Add a fw_cfg file (e.g. opt/org.example/config) for firmware or the guest.
     -k config_file
             Read key=value configuration lines (bhyve_config(5)).
     -o var=value
             Set a configuration key. Keys: boot.kernel, boot.initrd, boot.cmdline, cpus,
             memory.size, lpc.comN.path, lpc.pc-testdev, pci.B.S.F.device, vcpu.N.cpuset, ...
     --kernel path, --initrd path, --append cmdline
             Same as -o boot.kernel=, -o boot.initrd=, -o boot.cmdline=.
     -r file Restore the snapshot file (guest memory; the vCPU and device state are in
             file.kern), as written by rhyvectl --checkpoint=file or --suspend=file. Give
             the same -c, -m, -s and -l options as the saved VM (disks and taps are named
             again, they are not in the snapshot); no --kernel. A snapshot of another
             format version, a corrupt one, or one whose CPU features (CPUID), memory or
             devices differ is refused (exit 4). The memory file is mapped privately: pages
             are read when the guest touches them, and the file never changes.
     -p vcpu:hostcpu
             Pin a vCPU to a host CPU (may repeat).
     -e      Exit on unhandled I/O port or MMIO accesses.
     -D      Destroy the VM object on guest power-off (exit 1); objects rhyveload created
             otherwise outlive rhyve.
     -A      ACPI tables are always generated (accepted for compatibility).
     -H, -P  Yield the vCPU on HLT / PAUSE (KVM always does; accepted for compatibility).
     -S      Wire guest memory (memory.wired): all of it is allocated, mapped writable
             and locked before the guest runs; exit 4 if it cannot be (RLIMIT_MEMLOCK).
     -a, -x, -w, -u, -W, -Y, -C
             Accepted for compatibility; recorded as configuration keys.
     -U uuid Set the system UUID.
     -h      This help.

ENVIRONMENT
     RHYVE_KVM_DEV   KVM device (default /dev/kvm).
     RHYVE_RUNDIR    Runtime directory base (default /run/rhyve); the VM lives in
                     RUNDIR/vmname with its guest RAM file `memory`, its `pid` and,
                     once rhyveload ran, `config` and `boot-state`.
     RHYVE_LOG       Log level on stderr: error, warn (default), info, debug.

EXIT STATUS
     0  rebooted      1  powered off (also on SIGTERM)      2  halted
     3  triple fault  4  error (bad arguments, KVM failure, emulation failure)
     With pc-testdev, a guest write of N to port 0xf4 exits with (N << 1) | 1.

EXAMPLE
     rhyve -c 2 -m 512M -s 0,hostbridge -s 31,lpc -l com1,stdio \\
           --kernel bzImage --initrd initrd.img --append console=ttyS0 vm0
";

/// How long the exit waits for stdout and stderr to take what is queued.
const EXIT_FLUSH: std::time::Duration = std::time::Duration::from_millis(500);

fn main() {
    let start = Instant::now();
    let mut argv = std::env::args();
    let program = argv.next().unwrap_or_default();
    let args: Vec<String> = argv.collect();
    if fcapi::is_firecracker_invocation(&program, &args) {
        // Firecracker's command line and API; its own logger and exit codes.
        let code = fcapi::main(&program, &args, start);
        terminal::restore();
        host_output::flush(EXIT_FLUSH);
        std::process::exit(code);
    }
    logger::init();
    let code = match cli::parse(&args) {
        Ok(Command::Help) => {
            print!("{HELP}");
            0
        }
        Ok(Command::Version) => {
            println!("rhyve {}", env!("CARGO_PKG_VERSION"));
            0
        }
        Ok(Command::EmulationHelp) => {
            print!("{}", emulations::help());
            0
        }
        Ok(Command::LpcHelp) => {
            print!("{}", emulations::lpc_help());
            0
        }
        Ok(Command::Run(tree)) => match config::VmConfig::from_tree(&tree) {
            Ok(cfg) => match machine::run(cfg, start) {
                Ok(code) => code,
                Err(e) => {
                    // Through the queue, after the log lines before it.
                    host_output::stderr(format!("rhyve: {e:#}\n").as_bytes());
                    4
                }
            },
            Err(e) => {
                host_output::stderr(format!("rhyve: {e}\n").as_bytes());
                4
            }
        },
        Err(e) => {
            host_output::stderr(format!("rhyve: {e}\n").as_bytes());
            4
        }
    };
    terminal::restore();
    // Whatever is still queued for stdout and stderr, unless nobody reads them.
    let dropped = host_output::flush(EXIT_FLUSH);
    if dropped > 0 {
        host_output::stderr(
            format!("rhyve: {dropped} bytes of console output dropped: stdout was not read\n")
                .as_bytes(),
        );
        host_output::flush(EXIT_FLUSH);
    }
    std::process::exit(code);
}

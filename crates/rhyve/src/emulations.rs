//! The registry of `-s` emulations (bhyve's pci_emul table): `-s slot,NAME` is a lookup here,
//! and `rhyve -s help` prints this list. Adding a device is one file plus one line below.

/// One PCI device emulation.
#[derive(Debug)]
pub struct Emulation {
    /// The name used in `-s slot,NAME`.
    pub name: &'static str,
    /// One line for `-s help`.
    pub description: &'static str,
    /// Configuration keys the emulation reads below `pci.B.S.F.`.
    pub keys: &'static [&'static str],
}

static HOSTBRIDGE: Emulation = Emulation {
    name: "hostbridge",
    description: "PCI host bridge (the PCI bus itself arrives with the PCI issue)",
    keys: &[],
};

static AMD_HOSTBRIDGE: Emulation = Emulation {
    name: "amd_hostbridge",
    description: "PCI host bridge with AMD's IDs",
    keys: &[],
};

static LPC: Emulation = Emulation {
    name: "lpc",
    description: "LPC bridge carrying the legacy devices configured with -l",
    keys: &[],
};

/// Every emulation, in `-s help` order.
pub static EMULATIONS: &[&Emulation] = &[&HOSTBRIDGE, &AMD_HOSTBRIDGE, &LPC];

/// Looks an emulation up by name.
pub fn find(name: &str) -> Option<&'static Emulation> {
    EMULATIONS.iter().copied().find(|e| e.name == name)
}

/// The text of `-s help`.
pub fn help() -> String {
    EMULATIONS
        .iter()
        .map(|e| format!("{:<16} {}\n", e.name, e.description))
        .collect()
}

/// LPC devices for `-l help`.
pub fn lpc_help() -> String {
    [
        (
            "com1..com4",
            "16550 UART; backend: stdio or a device path (e.g. -l com1,stdio)",
        ),
        (
            "pc-testdev",
            "test device: a write of N to port 0xf4 exits rhyve with (N<<1)|1",
        ),
    ]
    .iter()
    .map(|(n, d)| format!("{n:<16} {d}\n"))
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_lookup_and_help() {
        assert!(find("hostbridge").is_some());
        assert!(find("lpc").is_some());
        assert!(find("virtio-frob").is_none());
        assert!(help().contains("amd_hostbridge"));
        let mut names: Vec<_> = EMULATIONS.iter().map(|e| e.name).collect();
        names.dedup();
        assert_eq!(names.len(), EMULATIONS.len());
    }
}

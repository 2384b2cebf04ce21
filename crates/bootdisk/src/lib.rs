//! bootdisk: finds what to boot inside a disk image, like grub2-bhyve / bhyveload do.
//!
//! Block layer (raw files, block devices, read-only qcow2) → partition table (GPT, MBR, or
//! none: the whole disk as one filesystem) → filesystems (ext2/3/4, FAT) → boot configuration,
//! tried in this order over every partition: Boot Loader Specification entries, the default
//! entry of grub.cfg, extlinux.conf/syslinux.cfg, then Debian's /vmlinuz and /initrd.img
//! symlinks. Everything read from the image is untrusted: malformed data gives an `Error`.

mod block;
mod bls;
mod error;
mod ext;
mod extlinux;
mod fat;
mod fs;
mod grub;
mod partition;
mod qcow2;

pub use block::{Disk, MemDisk, RawDisk};
pub use error::{Error, Result};
pub use fs::{Fs, HostDir, Kind, MAX_SYMLINKS};
pub use partition::{PartKind, Partition, TableKind};

use partition::read_table;
use std::path::Path;
use std::rc::Rc;

/// Default for `Options::max_file_bytes`: larger than any distribution kernel or initrd.
pub const DEFAULT_MAX_FILE_BYTES: u64 = 512 << 20;

#[derive(Debug, Clone)]
pub struct Options {
    /// Picks a specific entry: a title, an id (BLS file name without ".conf", GRUB `--id`), a
    /// GRUB index path ("1>2"), a "Submenu>Title" path, or a number: the 0-based position in
    /// the list of the first kind of configuration found (GRUB submenus flattened in place).
    pub entry: Option<String>,
    /// Replaces the entry's command line.
    pub cmdline: Option<String>,
    /// A kernel or initrd larger than this is `Error::FileTooBig`.
    pub max_file_bytes: u64,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            entry: None,
            cmdline: None,
            max_file_bytes: DEFAULT_MAX_FILE_BYTES,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootSource {
    Bls,
    Grub,
    Extlinux,
    DebianSymlinks,
}

impl std::fmt::Display for BootSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BootSource::Bls => "boot loader spec entry",
            BootSource::Grub => "grub.cfg",
            BootSource::Extlinux => "extlinux/syslinux config",
            BootSource::DebianSymlinks => "Debian /vmlinuz symlinks",
        })
    }
}

#[derive(Debug, Clone)]
pub struct BootSelection {
    pub source: BootSource,
    pub title: Option<String>,
    /// Path inside the guest filesystem (symlinks resolved), for the printout.
    pub kernel_path: String,
    pub kernel: Vec<u8>,
    pub initrd_path: Option<String>,
    pub initrd: Option<Vec<u8>>,
    /// The entry's command line (root= kept), or `Options::cmdline`.
    pub cmdline: String,
}

/// One filesystem found on the disk (or the host directory).
struct Volume {
    fs: Box<dyn Fs>,
    part: Option<Partition>,
    table: Option<TableKind>,
    ext_uuid: Option<String>,
}

/// A bootable entry, before its files are read.
#[derive(Debug, Clone)]
struct Candidate {
    source: BootSource,
    title: Option<String>,
    /// Names `Options::entry` may use besides the title.
    ids: Vec<String>,
    kernel: String,
    initrd: Vec<String>,
    cmdline: String,
    vol: usize,
    /// Directory tried first for the entry's paths ("/" or e.g. "/boot", the config's dir).
    base: String,
}

struct Menu {
    config: String,
    entries: Vec<Candidate>,
    default: usize,
}

/// Opens a raw image, block device or qcow2 image and finds what to boot in it.
pub fn find_boot_in_image(image: &Path, opts: &Options) -> Result<BootSelection> {
    let disk = open_image(image)?;
    let vols = volumes(disk)?;
    find_boot(&vols, opts)
}

/// Treats a host directory as the guest's root filesystem (bhyveload -h).
pub fn find_boot_in_dir(root: &Path, opts: &Options) -> Result<BootSelection> {
    let vols = vec![Volume {
        fs: Box::new(HostDir::new(root.to_path_buf())?),
        part: None,
        table: None,
        ext_uuid: None,
    }];
    find_boot(&vols, opts)
}

/// Finds what to boot on an already opened disk (used by tests on in-memory images).
pub fn find_boot_on_disk(disk: Rc<dyn Disk>, opts: &Options) -> Result<BootSelection> {
    let vols = volumes(disk)?;
    find_boot(&vols, opts)
}

/// Raw file or block device, or qcow2 when the file starts with its magic.
pub fn open_image(image: &Path) -> Result<Rc<dyn Disk>> {
    let raw: Rc<dyn Disk> = Rc::new(RawDisk::open(image)?);
    if qcow2::is_qcow2(&*raw)? {
        Ok(Rc::new(qcow2::Qcow2::open(raw)?))
    } else {
        Ok(raw)
    }
}

/// Wraps a disk as qcow2 (for callers holding an in-memory image).
pub fn open_qcow2(file: Rc<dyn Disk>) -> Result<Rc<dyn Disk>> {
    Ok(Rc::new(qcow2::Qcow2::open(file)?))
}

/// A recognised filesystem and, for ext, its UUID.
type Probed = (Box<dyn Fs>, Option<String>);

fn probe_fs(disk: Rc<dyn Disk>, name: String) -> Result<Option<Probed>> {
    if let Some(e) = ext::ExtFs::probe(disk.clone(), name.clone())? {
        let uuid = e.uuid().to_string();
        return Ok(Some((Box::new(e), Some(uuid))));
    }
    if let Some(f) = fat::FatFs::probe(disk, name)? {
        return Ok(Some((Box::new(f), None)));
    }
    Ok(None)
}

/// Every recognised filesystem on the disk, in partition order.
fn volumes(disk: Rc<dyn Disk>) -> Result<Vec<Volume>> {
    let name = disk.name().to_string();
    let Some((table, parts)) = read_table(&*disk)? else {
        return match probe_fs(disk, name.clone())? {
            Some((fs, ext_uuid)) => Ok(vec![Volume {
                fs,
                part: None,
                table: None,
                ext_uuid,
            }]),
            None => Err(Error::NoFilesystem(name)),
        };
    };
    let mut vols = Vec::new();
    let mut first_err = None;
    for p in parts {
        let pname = format!("partition {}", p.index);
        let slice = Rc::new(block::Slice::new(
            disk.clone(),
            p.start,
            p.len,
            pname.clone(),
        ));
        match probe_fs(slice, pname) {
            Ok(Some((fs, ext_uuid))) => vols.push(Volume {
                fs,
                part: Some(p),
                table: Some(table),
                ext_uuid,
            }),
            Ok(None) => {}
            // A damaged partition should not hide a good one next to it.
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    if vols.is_empty() {
        return Err(first_err.unwrap_or(Error::NoFilesystemInPartitions(name)));
    }
    Ok(vols)
}

fn join_path(dir: &str, p: &str) -> String {
    if p.starts_with('/') {
        p.to_string()
    } else {
        format!("{}/{p}", dir.trim_end_matches('/'))
    }
}

fn bls_menu(vols: &[Volume], looked: &mut Vec<String>) -> Result<Option<Menu>> {
    let mut entries = Vec::new();
    let mut default_glob = None;
    for (vi, v) in vols.iter().enumerate() {
        for (dir, base) in [("/loader/entries", "/"), ("/boot/loader/entries", "/boot")] {
            looked.push(format!("{dir}/*.conf on {}", v.fs.describe()));
            for name in fs::list_dir(&*v.fs, dir)? {
                let Some(id) = name.strip_suffix(".conf") else {
                    continue;
                };
                let Some(text) = fs::read_text_opt(&*v.fs, &format!("{dir}/{name}"))? else {
                    continue;
                };
                let e = bls::parse(id, &text);
                if e.linux.is_some() {
                    entries.push((e, vi, base));
                }
            }
        }
        if default_glob.is_none() {
            for conf in ["/loader/loader.conf", "/boot/loader/loader.conf"] {
                if let Some(t) = fs::read_text_opt(&*v.fs, conf)? {
                    default_glob = bls::loader_conf_default(&t);
                    break;
                }
            }
        }
    }
    if entries.is_empty() {
        return Ok(None);
    }
    let mut sorted: Vec<bls::BlsEntry> = entries.iter().map(|(e, _, _)| e.clone()).collect();
    bls::sort(&mut sorted);
    let cands: Vec<Candidate> = sorted
        .iter()
        .filter_map(|e| {
            let (_, vi, base) = entries.iter().find(|(x, _, _)| x == e)?;
            Some(Candidate {
                source: BootSource::Bls,
                title: e.title.clone().or_else(|| Some(e.id.clone())),
                ids: vec![e.id.clone(), format!("{}.conf", e.id)],
                kernel: e.linux.clone().unwrap_or_default(),
                initrd: e.initrd.clone(),
                cmdline: e.options.join(" "),
                vol: *vi,
                base: base.to_string(),
            })
        })
        .collect();
    let default = default_glob
        .and_then(|g| {
            cands
                .iter()
                .position(|c| c.ids.iter().any(|id| bls::glob_match(&g, id)))
        })
        .unwrap_or(0);
    Ok(Some(Menu {
        config: "loader/entries".into(),
        entries: cands,
        default,
    }))
}

fn grub_menu(vols: &[Volume], looked: &mut Vec<String>) -> Result<Option<Menu>> {
    const CONFIGS: [&str; 4] = [
        "/boot/grub/grub.cfg",
        "/grub/grub.cfg",
        "/boot/grub2/grub.cfg",
        "/grub2/grub.cfg",
    ];
    for (vi, v) in vols.iter().enumerate() {
        for cfg in CONFIGS {
            looked.push(format!("{cfg} on {}", v.fs.describe()));
            let Some(text) = fs::read_text_opt(&*v.fs, cfg)? else {
                continue;
            };
            let dir = cfg.trim_end_matches("/grub.cfg");
            let env = fs::read_text_opt(&*v.fs, &format!("{dir}/grubenv"))?
                .map(|t| grub::parse_grubenv(&t))
                .unwrap_or_default();
            let menu = grub::parse(&text, env);
            let default = menu.default_index();
            let entries: Vec<Candidate> = menu
                .entries
                .iter()
                .filter_map(|e| {
                    Some(Candidate {
                        source: BootSource::Grub,
                        title: Some(e.title.clone()),
                        ids: [
                            Some(e.index_path.clone()),
                            Some(e.title_path.clone()),
                            e.id.clone(),
                        ]
                        .into_iter()
                        .flatten()
                        .collect(),
                        kernel: e.linux.clone()?,
                        initrd: e.initrd.clone(),
                        cmdline: e.args.clone(),
                        vol: vi,
                        base: "/".into(),
                    })
                })
                .collect();
            if entries.is_empty() {
                continue;
            }
            // `default` indexes all entries; entries without `linux` were dropped.
            let chosen = menu.entries.get(default).map(|e| e.index_path.clone());
            let default = chosen
                .and_then(|ip| entries.iter().position(|c| c.ids.first() == Some(&ip)))
                .unwrap_or(0);
            return Ok(Some(Menu {
                config: format!("{cfg} on {}", v.fs.describe()),
                entries,
                default,
            }));
        }
    }
    Ok(None)
}

fn extlinux_menu(vols: &[Volume], looked: &mut Vec<String>) -> Result<Option<Menu>> {
    const CONFIGS: [&str; 7] = [
        "/boot/extlinux/extlinux.conf",
        "/extlinux/extlinux.conf",
        "/extlinux.conf",
        "/boot/extlinux.conf",
        "/boot/syslinux/syslinux.cfg",
        "/syslinux/syslinux.cfg",
        "/syslinux.cfg",
    ];
    for (vi, v) in vols.iter().enumerate() {
        for cfg in CONFIGS {
            looked.push(format!("{cfg} on {}", v.fs.describe()));
            let Some(text) = fs::read_text_opt(&*v.fs, cfg)? else {
                continue;
            };
            let c = extlinux::parse(&text);
            let dir = cfg.rsplit_once('/').map(|(d, _)| d).unwrap_or("");
            let dir = if dir.is_empty() { "/" } else { dir };
            let default_name = c.labels.get(c.default_index()).map(|l| l.name.clone());
            let entries: Vec<Candidate> = c
                .labels
                .iter()
                .filter_map(|l| {
                    Some(Candidate {
                        source: BootSource::Extlinux,
                        title: Some(l.title.clone().unwrap_or_else(|| l.name.clone())),
                        ids: vec![l.name.clone()],
                        kernel: join_path(dir, l.kernel.as_deref()?),
                        initrd: l.initrd.iter().map(|i| join_path(dir, i)).collect(),
                        cmdline: l.append.clone(),
                        vol: vi,
                        base: "/".into(),
                    })
                })
                .collect();
            if entries.is_empty() {
                continue;
            }
            let default = default_name
                .and_then(|n| entries.iter().position(|e| e.ids[0] == n))
                .unwrap_or(0);
            return Ok(Some(Menu {
                config: format!("{cfg} on {}", v.fs.describe()),
                entries,
                default,
            }));
        }
    }
    Ok(None)
}

/// The kernel command line for a Debian symlink boot, which has no entry to take it from.
fn guess_root(v: &Volume, has_initrd: bool) -> String {
    match (&v.ext_uuid, &v.part, v.table) {
        // An initramfs can find the filesystem by UUID wherever the disk shows up.
        (Some(u), _, _) if has_initrd => format!("root=UUID={u} ro"),
        (_, Some(p), Some(TableKind::Gpt)) if p.uuid.is_some() => {
            format!("root=PARTUUID={} ro", p.uuid.clone().unwrap_or_default())
        }
        (_, Some(p), _) => format!("root=/dev/vda{} ro", p.index),
        (_, None, None) if v.ext_uuid.is_some() => "root=/dev/vda ro".into(),
        _ => "ro".into(),
    }
}

fn debian_menu(vols: &[Volume], looked: &mut Vec<String>) -> Result<Option<Menu>> {
    let mut entries = Vec::new();
    for (vi, v) in vols.iter().enumerate() {
        for (k, i) in [
            ("/vmlinuz", "/initrd.img"),
            ("/boot/vmlinuz", "/boot/initrd.img"),
        ] {
            looked.push(format!("{k} on {}", v.fs.describe()));
            if v.fs.lstat(k)?.is_none() {
                continue;
            }
            let has_initrd = v.fs.lstat(i)?.is_some();
            entries.push(Candidate {
                source: BootSource::DebianSymlinks,
                title: None,
                ids: vec![k.to_string()],
                kernel: k.to_string(),
                initrd: if has_initrd {
                    vec![i.to_string()]
                } else {
                    vec![]
                },
                cmdline: guess_root(v, has_initrd),
                vol: vi,
                base: "/".into(),
            });
        }
    }
    if entries.is_empty() {
        return Ok(None);
    }
    Ok(Some(Menu {
        config: "/vmlinuz symlinks".into(),
        entries,
        default: 0,
    }))
}

/// Reads `path` for an entry of volume `vi`: first under the entry's base directory, then from
/// the volume's root, then, for "/boot/..." paths, from the other volumes without the "/boot"
/// prefix (a separate /boot partition). Returns "canonical path" and the bytes.
fn read_entry_file(
    vols: &[Volume],
    c: &Candidate,
    what: &str,
    path: &str,
    max: u64,
) -> Result<(String, Vec<u8>)> {
    let path = fs::normalize(path)?;
    let mut tries: Vec<(usize, String)> = Vec::new();
    if c.base != "/" {
        tries.push((c.vol, join_path(&c.base, path.trim_start_matches('/'))));
    }
    tries.push((c.vol, path.clone()));
    let mut tried = Vec::new();
    let mut i = 0;
    while i < tries.len() {
        let (vi, p) = tries[i].clone();
        i += 1;
        let Some(v) = vols.get(vi) else { continue };
        match fs::read_file(&*v.fs, &p, max) {
            Ok(r) => return Ok(r),
            Err(Error::NotFound(msg)) | Err(Error::NotADirectory(msg)) => {
                // A symlink may have led to /boot/... on the root filesystem.
                let missing = msg.split(" on ").next().unwrap_or("").to_string();
                tried.push(format!("{p} on {}", v.fs.describe()));
                for m in [p.as_str(), missing.as_str()] {
                    if let Some(rest) = m.strip_prefix("/boot/") {
                        for oi in std::iter::once(vi).chain(0..vols.len()) {
                            let t = (oi, format!("/{rest}"));
                            if !tries.contains(&t) {
                                tries.push(t);
                            }
                        }
                    }
                }
            }
            Err(e) => return Err(e),
        }
    }
    Err(Error::NoKernel(format!(
        "{} entry {:?} names {what} {path}, not found (tried {})",
        c.source,
        c.title.as_deref().unwrap_or(""),
        tried.join(", ")
    )))
}

fn pick<'m>(menus: &'m [Menu], sel: Option<&str>) -> Result<(&'m Menu, &'m Candidate)> {
    let Some(sel) = sel else {
        let m = &menus[0];
        return Ok((m, &m.entries[m.default.min(m.entries.len() - 1)]));
    };
    if let Ok(n) = sel.parse::<usize>() {
        if let Some(c) = menus[0].entries.get(n) {
            return Ok((&menus[0], c));
        }
    }
    for m in menus {
        if let Some(c) = m
            .entries
            .iter()
            .find(|c| c.ids.iter().any(|i| i == sel) || c.title.as_deref() == Some(sel))
        {
            return Ok((m, c));
        }
    }
    let available = menus
        .iter()
        .flat_map(|m| {
            m.entries.iter().enumerate().map(move |(i, c)| {
                format!(
                    "{i}: {:?} ({}, {})",
                    c.title.as_deref().unwrap_or(&c.kernel),
                    c.ids.join("|"),
                    m.config
                )
            })
        })
        .collect::<Vec<_>>()
        .join("; ");
    Err(Error::EntryNotFound {
        wanted: sel.to_string(),
        available,
    })
}

fn find_boot(vols: &[Volume], opts: &Options) -> Result<BootSelection> {
    let mut looked = Vec::new();
    let mut menus = Vec::new();
    for f in [bls_menu, grub_menu, extlinux_menu, debian_menu] {
        if let Some(m) = f(vols, &mut looked)? {
            menus.push(m);
        }
    }
    if menus.is_empty() {
        return Err(Error::NoKernel(looked.join(", ")));
    }
    let (_, c) = pick(&menus, opts.entry.as_deref())?;
    let max = opts.max_file_bytes;
    let (kernel_path, kernel) = read_entry_file(vols, c, "kernel", &c.kernel, max)?;
    let mut initrd: Option<Vec<u8>> = None;
    let mut initrd_paths = Vec::new();
    for p in &c.initrd {
        let (path, data) = read_entry_file(vols, c, "initrd", p, max)?;
        let buf = initrd.get_or_insert_with(Vec::new);
        // Several initrds are concatenated (the kernel unpacks each cpio archive in turn);
        // GRUB aligns each to 4 bytes.
        buf.resize(buf.len().next_multiple_of(4), 0);
        if (buf.len() + data.len()) as u64 > max {
            return Err(Error::FileTooBig {
                path: format!("initrds {}", c.initrd.join(" ")),
                size: (buf.len() + data.len()) as u64,
                max,
            });
        }
        buf.extend_from_slice(&data);
        initrd_paths.push(path);
    }
    Ok(BootSelection {
        source: c.source,
        title: c.title.clone(),
        kernel_path,
        kernel,
        initrd_path: (!initrd_paths.is_empty()).then(|| initrd_paths.join(" ")),
        initrd,
        cmdline: opts.cmdline.clone().unwrap_or_else(|| c.cmdline.clone()),
    })
}

/// Random text made of the tokens config parsers care about, for their robustness tests.
#[cfg(test)]
pub(crate) fn random_config(seed: u64, tokens: &[&str], n: usize) -> String {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = String::new();
    for _ in 0..n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.push_str(tokens[(x % tokens.len() as u64) as usize]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;
    use std::path::PathBuf;

    fn tree(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("bootdisk-lib-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("boot/grub")).unwrap();
        d
    }

    #[test]
    fn host_dir_debian_symlinks() {
        let d = tree("deb");
        std::fs::write(d.join("boot/vmlinuz-6.1"), b"KERNEL").unwrap();
        std::fs::write(d.join("boot/initrd.img-6.1"), b"INITRD").unwrap();
        symlink("boot/vmlinuz-6.1", d.join("vmlinuz")).unwrap();
        symlink("/boot/initrd.img-6.1", d.join("initrd.img")).unwrap();
        let s = find_boot_in_dir(&d, &Options::default()).unwrap();
        assert_eq!(s.source, BootSource::DebianSymlinks);
        assert_eq!(s.kernel, b"KERNEL");
        assert_eq!(s.kernel_path, "/boot/vmlinuz-6.1");
        assert_eq!(s.initrd.as_deref(), Some(&b"INITRD"[..]));
        let o = Options {
            cmdline: Some("console=ttyS0 root=/dev/vda1".into()),
            ..Options::default()
        };
        assert_eq!(
            find_boot_in_dir(&d, &o).unwrap().cmdline,
            "console=ttyS0 root=/dev/vda1"
        );
        let o = Options {
            max_file_bytes: 3,
            ..Options::default()
        };
        assert!(matches!(
            find_boot_in_dir(&d, &o),
            Err(Error::FileTooBig { .. })
        ));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn host_dir_grub_beats_symlinks_and_entry_selects() {
        let d = tree("grub");
        std::fs::write(d.join("boot/a"), b"A").unwrap();
        std::fs::write(d.join("boot/b"), b"B").unwrap();
        std::fs::write(d.join("boot/ib"), b"IB").unwrap();
        symlink("boot/a", d.join("vmlinuz")).unwrap();
        std::fs::write(
            d.join("boot/grub/grub.cfg"),
            "set default=1\nset r=/dev/vda2\nmenuentry 'A' { linux /boot/a root=$r }\nmenuentry 'B' --id bee { linux /boot/b root=${r} quiet\n initrd /boot/ib }\n",
        )
        .unwrap();
        let s = find_boot_in_dir(&d, &Options::default()).unwrap();
        assert_eq!(
            (s.source, s.title.as_deref()),
            (BootSource::Grub, Some("B"))
        );
        assert_eq!(
            (s.kernel.as_slice(), s.cmdline.as_str()),
            (&b"B"[..], "root=/dev/vda2 quiet")
        );
        assert_eq!(s.initrd.as_deref(), Some(&b"IB"[..]));
        for (sel, want) in [("A", "A"), ("0", "A"), ("bee", "B")] {
            let o = Options {
                entry: Some(sel.into()),
                ..Options::default()
            };
            assert_eq!(
                find_boot_in_dir(&d, &o).unwrap().title.as_deref(),
                Some(want)
            );
        }
        let o = Options {
            entry: Some("/vmlinuz".into()),
            ..Options::default()
        };
        assert_eq!(
            find_boot_in_dir(&d, &o).unwrap().source,
            BootSource::DebianSymlinks
        );
        let o = Options {
            entry: Some("nope".into()),
            ..Options::default()
        };
        let e = find_boot_in_dir(&d, &o).unwrap_err().to_string();
        assert!(e.contains("\"A\"") && e.contains("bee"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn nothing_to_boot_lists_what_was_looked_for() {
        let d = tree("empty");
        let e = find_boot_in_dir(&d, &Options::default()).unwrap_err();
        let s = e.to_string();
        assert!(matches!(e, Error::NoKernel(_)));
        assert!(
            s.contains("/boot/grub/grub.cfg")
                && s.contains("/vmlinuz")
                && s.contains("loader/entries"),
            "{s}"
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn missing_kernel_of_an_entry_is_no_kernel() {
        let d = tree("missing");
        std::fs::write(
            d.join("boot/grub/grub.cfg"),
            "menuentry x { linux /boot/gone }",
        )
        .unwrap();
        let e = find_boot_in_dir(&d, &Options::default()).unwrap_err();
        assert!(matches!(e, Error::NoKernel(_)), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }
}

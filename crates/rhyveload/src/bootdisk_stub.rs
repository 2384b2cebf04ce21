//! Stand-in for the `bootdisk` crate (branch `load`), with its API from
//! notes/issue6-contract.md, until that branch is merged: disk images are refused, and a
//! host directory is searched only for Debian's `/vmlinuz` + `/initrd.img` symlinks.
//! Delete this file and use `bootdisk` once it lands (see main.rs).
#![allow(dead_code)] // the contract's full API, not all of it used by the stand-in

use std::path::Path;

/// How to choose.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// `-e entry=TITLE|ID|INDEX`.
    pub entry: Option<String>,
    /// `-e cmdline=...` replaces the entry's command line.
    pub cmdline: Option<String>,
    /// Larger kernel or initrd files are refused.
    pub max_file_bytes: u64,
}

/// Where the entry came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootSource {
    /// Boot Loader Specification entries.
    Bls,
    /// grub.cfg.
    Grub,
    /// extlinux.conf / syslinux.cfg.
    Extlinux,
    /// Debian's /vmlinuz and /initrd.img symlinks.
    DebianSymlinks,
}

/// What to boot.
#[derive(Debug, Clone)]
pub struct BootSelection {
    /// Which configuration it came from.
    pub source: BootSource,
    /// Entry title.
    pub title: Option<String>,
    /// Kernel path inside the guest filesystem.
    pub kernel_path: String,
    /// Kernel bytes.
    pub kernel: Vec<u8>,
    /// Initrd path.
    pub initrd_path: Option<String>,
    /// Initrd bytes.
    pub initrd: Option<Vec<u8>>,
    /// Command line.
    pub cmdline: String,
}

/// Why nothing can be booted.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// disk images need bootdisk
    #[error("{0}: reading disk images is not available in this build (needs the bootdisk crate)")]
    Unsupported(String),
    /// nothing found
    #[error("{0}: no kernel found (looked for /vmlinuz and /boot/vmlinuz)")]
    NoKernel(String),
    /// too big
    #[error("{path}: {size} bytes is more than the {max} allowed")]
    FileTooBig {
        /// Path.
        path: String,
        /// Its size.
        size: u64,
        /// The limit.
        max: u64,
    },
    /// I/O
    #[error("{path}: {source}")]
    Io {
        /// Path.
        path: String,
        /// The error.
        source: std::io::Error,
    },
}

/// Disk images: not without bootdisk.
pub fn find_boot_in_image(image: &Path, _opts: &Options) -> Result<BootSelection, Error> {
    Err(Error::Unsupported(image.display().to_string()))
}

fn read(root: &Path, rel: &str, max: u64) -> Result<Option<Vec<u8>>, Error> {
    let p = root.join(rel.trim_start_matches('/'));
    let io = |source| Error::Io {
        path: rel.to_string(),
        source,
    };
    match std::fs::metadata(&p) {
        Ok(m) if m.len() > max => Err(Error::FileTooBig {
            path: rel.to_string(),
            size: m.len(),
            max,
        }),
        Ok(_) => std::fs::read(&p).map(Some).map_err(io),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(e)),
    }
}

/// A host directory: Debian's symlinks only.
pub fn find_boot_in_dir(root: &Path, opts: &Options) -> Result<BootSelection, Error> {
    for dir in ["/", "/boot/"] {
        let kpath = format!("{dir}vmlinuz");
        if let Some(kernel) = read(root, &kpath, opts.max_file_bytes)? {
            let ipath = format!("{dir}initrd.img");
            let initrd = read(root, &ipath, opts.max_file_bytes)?;
            return Ok(BootSelection {
                source: BootSource::DebianSymlinks,
                title: None,
                kernel_path: kpath,
                kernel,
                initrd_path: initrd.as_ref().map(|_| ipath),
                initrd,
                cmdline: opts.cmdline.clone().unwrap_or_default(),
            });
        }
    }
    Err(Error::NoKernel(root.display().to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debian_symlinks_in_a_directory() {
        let d = std::env::temp_dir().join(format!("rhyveload-stub-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("boot")).unwrap();
        let opts = Options {
            max_file_bytes: 100,
            ..Default::default()
        };
        assert!(matches!(
            find_boot_in_dir(&d, &opts),
            Err(Error::NoKernel(_))
        ));
        std::fs::write(d.join("boot/vmlinuz"), b"kernel").unwrap();
        let s = find_boot_in_dir(&d, &opts).unwrap();
        assert_eq!((s.kernel_path.as_str(), s.initrd), ("/boot/vmlinuz", None));
        std::fs::write(d.join("initrd.img"), b"rd").unwrap();
        std::fs::write(d.join("vmlinuz"), vec![0u8; 101]).unwrap();
        assert!(matches!(
            find_boot_in_dir(&d, &opts),
            Err(Error::FileTooBig { .. })
        ));
        std::fs::write(d.join("vmlinuz"), b"k").unwrap();
        let s = find_boot_in_dir(&d, &opts).unwrap();
        assert_eq!(s.initrd_path.as_deref(), Some("/initrd.img"));
        assert!(find_boot_in_image(&d, &opts).is_err());
        std::fs::remove_dir_all(&d).unwrap();
    }
}

//! The small filesystem interface the boot-config readers use, symlink resolution on top of it
//! (done here, once, so every backend gets the same loop detection and depth limit), and the
//! host-directory backend (bhyveload -h).

use crate::error::{Error, Result};
use std::collections::VecDeque;
use std::io::Read;
use std::path::PathBuf;

/// Like Linux's MAXSYMLINKS: more symlinks than this while resolving one path is a loop.
pub const MAX_SYMLINKS: u32 = 40;
/// Longest path we accept from a config file or a symlink.
const MAX_PATH: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File(u64),
    Dir,
    Symlink,
    Other,
}

/// A read-only filesystem. Paths handed to the backend are absolute, normalised and contain no
/// symlink except possibly the last component (the generic functions below ensure that).
pub trait Fs {
    /// For messages, e.g. "partition 2 (ext4)".
    fn describe(&self) -> String;
    /// What is at `path`, not following a final symlink; `None` when nothing is.
    fn lstat(&self, path: &str) -> Result<Option<Kind>>;
    fn read_link(&self, path: &str) -> Result<String>;
    /// Reads a regular file whose size `lstat` reported as `size`.
    fn read_file_raw(&self, path: &str, size: u64) -> Result<Vec<u8>>;
    /// Names in a directory, without "." and "..".
    fn list_dir_raw(&self, path: &str) -> Result<Vec<String>>;
}

/// Splits a path into components, refusing NULs and absurd lengths.
fn components(path: &str) -> Result<Vec<String>> {
    if path.len() > MAX_PATH || path.contains('\0') {
        return Err(Error::BadPath(path.chars().take(80).collect()));
    }
    Ok(path
        .split('/')
        .filter(|c| !c.is_empty())
        .map(str::to_string)
        .collect())
}

fn join(parts: &[String]) -> String {
    if parts.is_empty() {
        "/".to_string()
    } else {
        parts.iter().map(|p| format!("/{p}")).collect()
    }
}

/// Lexical normalisation: "a//b/./c/../d" → "/a/b/d". Relative paths are taken from the root.
pub fn normalize(path: &str) -> Result<String> {
    let mut out: Vec<String> = Vec::new();
    for c in components(path)? {
        match c.as_str() {
            "." => {}
            ".." => {
                out.pop();
            }
            _ => out.push(c),
        }
    }
    Ok(join(&out))
}

/// Resolves every symlink in `path` (the final one too when `follow_last`), returning the
/// canonical absolute path. Absolute link targets restart from this filesystem's root, relative
/// ones from the link's directory; ".." never climbs above the root.
pub fn resolve(fs: &dyn Fs, path: &str, follow_last: bool) -> Result<String> {
    let mut pending: VecDeque<String> = components(path)?.into();
    let mut done: Vec<String> = Vec::new();
    let mut links = 0u32;
    while let Some(c) = pending.pop_front() {
        match c.as_str() {
            "." => continue,
            ".." => {
                done.pop();
                continue;
            }
            _ => {}
        }
        done.push(c);
        let here = join(&done);
        match fs.lstat(&here)? {
            None => {
                let mut rest = done.clone();
                rest.extend(pending);
                return Err(Error::NotFound(format!(
                    "{} on {}",
                    join(&rest),
                    fs.describe()
                )));
            }
            Some(Kind::Symlink) if follow_last || !pending.is_empty() => {
                links += 1;
                if links > MAX_SYMLINKS {
                    return Err(Error::SymlinkLoop {
                        path: format!("{path} on {}", fs.describe()),
                        limit: MAX_SYMLINKS,
                    });
                }
                let target = fs.read_link(&here)?;
                done.pop();
                if target.starts_with('/') {
                    done.clear();
                }
                for t in components(&target)?.into_iter().rev() {
                    pending.push_front(t);
                }
                if pending.len() > MAX_PATH {
                    return Err(Error::BadPath(path.chars().take(80).collect()));
                }
            }
            Some(Kind::Dir) | Some(Kind::Symlink) => {}
            Some(Kind::File(_)) | Some(Kind::Other) => {
                if !pending.is_empty() {
                    return Err(Error::NotADirectory(here));
                }
            }
        }
    }
    Ok(join(&done))
}

/// Reads a file (following symlinks), refusing anything larger than `max` bytes.
/// Returns the canonical path and the contents.
pub fn read_file(fs: &dyn Fs, path: &str, max: u64) -> Result<(String, Vec<u8>)> {
    let real = resolve(fs, path, true)?;
    match fs.lstat(&real)? {
        Some(Kind::File(size)) => {
            if size > max {
                return Err(Error::FileTooBig {
                    path: format!("{path} on {}", fs.describe()),
                    size,
                    max,
                });
            }
            let data = fs.read_file_raw(&real, size)?;
            Ok((real, data))
        }
        Some(Kind::Dir) => Err(Error::NotAFile(path.to_string())),
        _ => Err(Error::NotAFile(path.to_string())),
    }
}

/// Reads a small text file (config files), lossily decoded.
pub fn read_text(fs: &dyn Fs, path: &str) -> Result<String> {
    const MAX_CONFIG: u64 = 4 << 20;
    let (_, b) = read_file(fs, path, MAX_CONFIG)?;
    Ok(String::from_utf8_lossy(&b).into_owned())
}

/// Like `read_text`, but a missing file is `None`.
pub fn read_text_opt(fs: &dyn Fs, path: &str) -> Result<Option<String>> {
    match read_text(fs, path) {
        Ok(t) => Ok(Some(t)),
        Err(Error::NotFound(_)) | Err(Error::NotADirectory(_)) | Err(Error::NotAFile(_)) => {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Sorted names in a directory (following symlinks); a missing directory is empty.
pub fn list_dir(fs: &dyn Fs, path: &str) -> Result<Vec<String>> {
    let real = match resolve(fs, path, true) {
        Ok(r) => r,
        Err(Error::NotFound(_)) | Err(Error::NotADirectory(_)) => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    if fs.lstat(&real)? != Some(Kind::Dir) {
        return Ok(Vec::new());
    }
    let mut v = fs.list_dir_raw(&real)?;
    v.sort();
    Ok(v)
}

/// A directory of the host taken as the root of a filesystem.
pub struct HostDir {
    root: PathBuf,
}

impl HostDir {
    pub fn new(root: PathBuf) -> Result<Self> {
        let md = std::fs::metadata(&root).map_err(|e| Error::io(root.display().to_string(), e))?;
        if !md.is_dir() {
            return Err(Error::NotADirectory(root.display().to_string()));
        }
        Ok(HostDir { root })
    }

    fn host(&self, path: &str) -> PathBuf {
        self.root.join(path.trim_start_matches('/'))
    }
}

impl Fs for HostDir {
    fn describe(&self) -> String {
        format!("host directory {}", self.root.display())
    }

    fn lstat(&self, path: &str) -> Result<Option<Kind>> {
        match std::fs::symlink_metadata(self.host(path)) {
            Ok(m) => {
                let t = m.file_type();
                Ok(Some(if t.is_symlink() {
                    Kind::Symlink
                } else if t.is_dir() {
                    Kind::Dir
                } else if t.is_file() {
                    Kind::File(m.len())
                } else {
                    Kind::Other
                }))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) if e.raw_os_error() == Some(libc_enotdir()) => Ok(None),
            Err(e) => Err(Error::io(self.host(path).display().to_string(), e)),
        }
    }

    fn read_link(&self, path: &str) -> Result<String> {
        let h = self.host(path);
        let t = std::fs::read_link(&h).map_err(|e| Error::io(h.display().to_string(), e))?;
        t.to_str()
            .map(str::to_string)
            .ok_or_else(|| Error::BadPath(t.display().to_string()))
    }

    fn read_file_raw(&self, path: &str, size: u64) -> Result<Vec<u8>> {
        let h = self.host(path);
        let name = h.display().to_string();
        let f = std::fs::File::open(&h).map_err(|e| Error::io(&name, e))?;
        // The file may grow after lstat; never read more than was checked against the limit.
        let mut data = Vec::with_capacity(size as usize);
        f.take(size)
            .read_to_end(&mut data)
            .map_err(|e| Error::io(&name, e))?;
        Ok(data)
    }

    fn list_dir_raw(&self, path: &str) -> Result<Vec<String>> {
        let h = self.host(path);
        let name = h.display().to_string();
        let mut out = Vec::new();
        for e in std::fs::read_dir(&h).map_err(|e| Error::io(&name, e))? {
            let e = e.map_err(|e| Error::io(&name, e))?;
            if let Some(s) = e.file_name().to_str() {
                out.push(s.to_string());
            }
        }
        Ok(out)
    }
}

fn libc_enotdir() -> i32 {
    20 // ENOTDIR on Linux
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("bootdisk-fs-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn normalize_paths() {
        assert_eq!(normalize("a//b/./c/../d").unwrap(), "/a/b/d");
        assert_eq!(normalize("/../..").unwrap(), "/");
        assert!(normalize("a\0b").is_err());
    }

    #[test]
    fn resolves_absolute_relative_and_dotdot_links_inside_the_root() {
        let d = tmpdir("links");
        std::fs::create_dir_all(d.join("boot")).unwrap();
        std::fs::write(d.join("boot/vmlinuz-6.1"), b"kernel").unwrap();
        symlink("boot/vmlinuz-6.1", d.join("vmlinuz")).unwrap();
        symlink("/boot", d.join("b")).unwrap();
        symlink("../../../../boot/vmlinuz-6.1", d.join("boot/up")).unwrap();
        // An absolute link to a host path must stay inside the root.
        symlink("/etc/passwd", d.join("passwd")).unwrap();
        let fs = HostDir::new(d.clone()).unwrap();
        assert_eq!(resolve(&fs, "/vmlinuz", true).unwrap(), "/boot/vmlinuz-6.1");
        assert_eq!(resolve(&fs, "/vmlinuz", false).unwrap(), "/vmlinuz");
        assert_eq!(
            resolve(&fs, "/b/vmlinuz-6.1", true).unwrap(),
            "/boot/vmlinuz-6.1"
        );
        assert_eq!(read_file(&fs, "/boot/up", 100).unwrap().1, b"kernel");
        assert!(matches!(
            read_file(&fs, "/passwd", 1 << 20),
            Err(Error::NotFound(_))
        ));
        assert!(matches!(
            read_file(&fs, "/vmlinuz", 3),
            Err(Error::FileTooBig {
                size: 6,
                max: 3,
                ..
            })
        ));
        assert!(matches!(
            read_file(&fs, "/boot", 100),
            Err(Error::NotAFile(_))
        ));
        assert!(matches!(
            resolve(&fs, "/vmlinuz/x", true),
            Err(Error::NotADirectory(_))
        ));
        assert_eq!(list_dir(&fs, "/b").unwrap(), vec!["up", "vmlinuz-6.1"]);
        assert!(list_dir(&fs, "/nope").unwrap().is_empty());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn symlink_loops_are_detected() {
        let d = tmpdir("loop");
        symlink("b", d.join("a")).unwrap();
        symlink("a", d.join("b")).unwrap();
        symlink("self/x", d.join("self")).unwrap();
        let fs = HostDir::new(d.clone()).unwrap();
        assert!(matches!(
            read_file(&fs, "/a", 10),
            Err(Error::SymlinkLoop { .. })
        ));
        assert!(matches!(
            read_file(&fs, "/self", 10),
            Err(Error::SymlinkLoop { .. })
        ));
        std::fs::remove_dir_all(&d).unwrap();
    }
}

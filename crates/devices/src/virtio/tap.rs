//! A Linux tap interface as virtio-net's backend: opened by name on /dev/net/tun
//! (`IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`) or adopted from a descriptor an orchestrator passed
//! us (`fd=N`). With a vnet header the guest's `virtio_net_hdr` goes through unchanged
//! (TUNSETVNETHDRSZ = 12, the VERSION_1 size) and negotiated offloads are pushed with
//! TUNSETOFFLOAD; an adopted tap without IFF_VNET_HDR works too, without offloads.
//!
//! The descriptor is non-blocking: the device thread polls it with epoll.

use std::ffi::CStr;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

/// Size of the vnet header exchanged with the tap (virtio_net_hdr + num_buffers).
pub const VNET_HDR_LEN: usize = 12;

/// TUNSETOFFLOAD bits (linux/if_tun.h).
pub const TUN_F_CSUM: u32 = 0x01;
pub const TUN_F_TSO4: u32 = 0x02;
pub const TUN_F_TSO6: u32 = 0x04;
pub const TUN_F_TSO_ECN: u32 = 0x08;

/// Why a tap could not be used; the messages name the interface or descriptor.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// interface name too long or not printable
    #[error("invalid tap name {0:?} (1-15 characters, no '/' or spaces)")]
    BadName(String),
    /// no such interface
    #[error("tap {0}: no such network interface (create it first: ip tuntap add {0} mode tap)")]
    Missing(String),
    /// exists but is not a tap
    #[error("{0}: not a tap interface (or a multi-queue tap, which rhyve does not use)")]
    NotTap(String),
    /// another process holds the tap
    #[error("tap {0} is busy: another process (VM) has it open")]
    Busy(String),
    /// permission
    #[error("tap {0}: permission denied (needs CAP_NET_ADMIN or the tap's owner)")]
    Permission(String),
    /// any other failure
    #[error("tap {what}: {source}")]
    Io { what: String, source: io::Error },
}

/// An open tap.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
    vnet_hdr: bool,
    /// Unit tests run the device on a SOCK_SEQPACKET pair (one read, one frame, as a tap);
    /// TUNSETOFFLOAD is recorded here instead.
    #[cfg(any(test, feature = "fuzzing"))]
    test_offload: Option<std::sync::atomic::AtomicU32>,
}

fn ifreq_with_name(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain old data; all zeroes is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    ifr
}

fn name_of(ifr: &libc::ifreq) -> String {
    let bytes: Vec<u8> = ifr
        .ifr_name
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Whether an interface of that name exists in this network namespace.
fn interface_exists(name: &str) -> bool {
    let Ok(c) = std::ffi::CString::new(name) else {
        return false;
    };
    let c: &CStr = &c;
    // SAFETY: a NUL-terminated string we own; the call only reads it.
    unsafe { libc::if_nametoindex(c.as_ptr()) != 0 }
}

impl Tap {
    /// Attaches to the existing tap `name` (it is not created: a typo must not make a new,
    /// unconnected interface). Errors: missing, not a tap, busy, permission.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        if name.is_empty()
            || name.len() >= libc::IFNAMSIZ
            || name.bytes().any(|b| b == b'/' || b <= b' ' || b >= 0x7f)
        {
            return Err(TapError::BadName(name.to_string()));
        }
        if !interface_exists(name) {
            return Err(TapError::Missing(name.to_string()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|source| TapError::Io {
                what: format!("{name}: cannot open /dev/net/tun"),
                source,
            })?;
        let mut ifr = ifreq_with_name(name);
        ifr.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as i16;
        // SAFETY: TUNSETIFF reads (and may update) the ifreq we pass, which outlives the call.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut ifr) };
        if r < 0 {
            let e = io::Error::last_os_error();
            let n = name.to_string();
            return Err(match e.raw_os_error() {
                // A tun, or an interface of another kind, under that name.
                Some(libc::EINVAL) => TapError::NotTap(n),
                Some(libc::EBUSY) => TapError::Busy(n),
                Some(libc::EPERM) | Some(libc::EACCES) => TapError::Permission(n),
                _ => TapError::Io {
                    what: format!("{n}: TUNSETIFF"),
                    source: e,
                },
            });
        }
        let tap = Tap {
            file,
            name: name_of(&ifr),
            vnet_hdr: true,
            #[cfg(any(test, feature = "fuzzing"))]
            test_offload: None,
        };
        tap.setup()?;
        Ok(tap)
    }

    /// Adopts `fd`, a tap descriptor opened by someone else (it is owned from here on and
    /// closed with the device). Must be a tap (TUNGETIFF); works with or without IFF_VNET_HDR.
    pub fn from_fd(fd: RawFd) -> Result<Tap, TapError> {
        let what = format!("fd={fd}");
        // SAFETY: F_GETFD only queries the descriptor table.
        if fd < 0 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(TapError::Io {
                what,
                source: io::Error::from_raw_os_error(libc::EBADF),
            });
        }
        // SAFETY: ifreq is plain old data; TUNGETIFF fills it.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        // SAFETY: TUNGETIFF writes into the ifreq we pass; any fd is safe to try it on.
        if unsafe { libc::ioctl(fd, libc::TUNGETIFF, &mut ifr) } < 0 {
            return Err(TapError::NotTap(what));
        }
        // SAFETY: TUNGETIFF filled ifru_flags.
        let flags = i32::from(unsafe { ifr.ifr_ifru.ifru_flags });
        if flags & libc::IFF_TAP == 0 {
            return Err(TapError::NotTap(format!("{what} ({})", name_of(&ifr))));
        }
        if flags & libc::IFF_NO_PI == 0 {
            return Err(TapError::Io {
                what: format!("{what} ({})", name_of(&ifr)),
                source: io::Error::other("opened without IFF_NO_PI"),
            });
        }
        // SAFETY: the caller handed the descriptor over; F_GETFD above proved it open.
        let file = unsafe { File::from_raw_fd(fd) };
        let tap = Tap {
            file,
            name: name_of(&ifr),
            vnet_hdr: flags & libc::IFF_VNET_HDR != 0,
            #[cfg(any(test, feature = "fuzzing"))]
            test_offload: None,
        };
        // SAFETY: F_GETFL/F_SETFL on our own descriptor.
        let fl = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        // SAFETY: as above.
        if fl < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK) } < 0 {
            return Err(TapError::Io {
                what,
                source: io::Error::last_os_error(),
            });
        }
        tap.setup()?;
        Ok(tap)
    }

    fn setup(&self) -> Result<(), TapError> {
        if self.vnet_hdr {
            let sz: libc::c_int = VNET_HDR_LEN as libc::c_int;
            // SAFETY: TUNSETVNETHDRSZ reads one int from the pointer we pass.
            if unsafe { libc::ioctl(self.file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &sz) } < 0 {
                return Err(TapError::Io {
                    what: format!("{}: TUNSETVNETHDRSZ", self.name),
                    source: io::Error::last_os_error(),
                });
            }
        }
        // No offloads until the guest negotiates them.
        self.set_offload(0).map_err(|source| TapError::Io {
            what: format!("{}: TUNSETOFFLOAD", self.name),
            source,
        })
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether frames carry a 12-byte vnet header.
    pub fn vnet_hdr(&self) -> bool {
        self.vnet_hdr
    }

    /// Tells the kernel which offloads the reader (the guest) accepts: TUN_F_* bits.
    /// Without a vnet header only 0 is possible.
    pub fn set_offload(&self, flags: u32) -> io::Result<()> {
        if !self.vnet_hdr {
            return Ok(());
        }
        #[cfg(any(test, feature = "fuzzing"))]
        if let Some(o) = &self.test_offload {
            o.store(flags, std::sync::atomic::Ordering::SeqCst);
            return Ok(());
        }
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        let r = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                flags as libc::c_ulong,
            )
        };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// Reads one frame (with its vnet header when `vnet_hdr`); `WouldBlock` when none waits.
    /// A tap returns the frame's whole length even when it was cut to fit `buf`: the result
    /// may exceed `buf.len()`.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: the kernel writes at most buf.len() bytes into buf.
        let r = unsafe { libc::read(self.file.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r as usize)
        }
    }

    /// Writes one frame from `iov` (one write is one frame; at most 1024 pieces).
    pub fn writev(&self, iov: &[libc::iovec]) -> io::Result<usize> {
        let cnt = iov.len().min(1024) as libc::c_int;
        // SAFETY: each iovec describes memory the caller keeps valid for the call (for guest
        // buffers: a guest RAM mapping that outlives the device thread); the kernel only
        // reads it. The guest changing those bytes meanwhile is its own race, as with DMA.
        let r = unsafe { libc::writev(self.file.as_raw_fd(), iov.as_ptr(), cnt) };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r as usize)
        }
    }

    /// Writes one frame from a contiguous buffer.
    pub fn write(&self, buf: &[u8]) -> io::Result<usize> {
        self.writev(&[libc::iovec {
            iov_base: buf.as_ptr() as *mut libc::c_void,
            iov_len: buf.len(),
        }])
    }
}

#[cfg(any(test, feature = "fuzzing"))]
impl Tap {
    /// A stand-in tap for unit tests: one end of a non-blocking SOCK_SEQPACKET pair; the
    /// other end (returned) plays the host network.
    pub(crate) fn socket_pair(vnet_hdr: bool) -> (Tap, File) {
        let mut fds = [0; 2];
        // SAFETY: socketpair writes two descriptors into the array we pass.
        let r = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        };
        assert_eq!(r, 0, "socketpair: {}", io::Error::last_os_error());
        // SAFETY: both descriptors are fresh and ours.
        let (a, b) = unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
        let tap = Tap {
            file: a,
            name: "testpair".into(),
            vnet_hdr,
            test_offload: Some(std::sync::atomic::AtomicU32::new(0)),
        };
        (tap, b)
    }

    #[cfg(test)]
    pub(crate) fn test_offload(&self) -> u32 {
        self.test_offload
            .as_ref()
            .map_or(0, |o| o.load(std::sync::atomic::Ordering::SeqCst))
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_names_are_refused_before_any_syscall() {
        for n in ["", "a/b", "tap 0", "0123456789abcdefg"] {
            assert!(matches!(Tap::open(n), Err(TapError::BadName(_))), "{n:?}");
        }
    }

    #[test]
    fn missing_interface_is_named() {
        let e = Tap::open("rhyvenosuch0").unwrap_err();
        assert!(matches!(e, TapError::Missing(_)), "{e}");
        assert!(e.to_string().contains("rhyvenosuch0"));
    }

    #[test]
    fn loopback_is_not_a_tap_and_a_file_is_not_a_tap_fd() {
        // "lo" exists in every namespace; TUNSETIFF on it fails with EINVAL (or EPERM when
        // unprivileged): either way it is refused with a message naming it.
        let e = Tap::open("lo").unwrap_err();
        assert!(e.to_string().contains("lo"), "{e}");
        let f = File::open("/dev/null").unwrap();
        let fd = f.as_raw_fd();
        assert!(matches!(Tap::from_fd(fd), Err(TapError::NotTap(_))));
        assert!(Tap::from_fd(-1).is_err());
    }
}

//! Network namespaces for the virtio-net tests and benchmark: each made by its user (`ip netns
//! add`), deleted when dropped, and the sockets and taps opened inside them. Nothing here
//! touches the host's own network.

use std::ffi::CStr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;

/// A network namespace this process created; deleted on drop.
pub struct Netns {
    name: String,
}

/// Runs `ip ARGS`; Err carries what failed and ip's stderr.
fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).output().map_err(|e| {
        format!("cannot run ip {args:?}: {e} (iproute2 installed? scripts/install-test-deps)")
    })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Netns {
    /// `ip netns add NAME`.
    pub fn add(name: String) -> Result<Netns, String> {
        ip(&["netns", "add", &name])?;
        Ok(Netns { name })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip netns exec NAME ARGS...`.
    pub fn exec(&self, args: &[&str]) -> Result<(), String> {
        let mut v = vec!["netns", "exec", &self.name];
        v.extend_from_slice(args);
        ip(&v)
    }

    /// Makes `cmd` start inside the namespace: its network namespace only. Unlike `ip netns
    /// exec`, which also gives the command a mount namespace of its own, whatever the
    /// command mounts (rhyve's runtime directory) stays visible to the caller and to
    /// rhyvectl.
    pub fn enter_on_exec(&self, cmd: &mut Command) {
        use std::os::unix::process::CommandExt;
        let path = format!("/run/netns/{}", self.name);
        // Opened here (close-on-exec): the child only calls setns between fork and exec.
        let ns = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        // SAFETY: the closure only makes one system call on a descriptor it owns, which is
        // async-signal-safe; it allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }

    /// Runs `f` on a thread that has entered the namespace (sockets and taps it opens stay
    /// in the namespace).
    pub fn within<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            // SAFETY: setns on a namespace file we opened; it only changes this thread.
            let r = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("thread in the namespace panicked")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// An AF_PACKET socket for `ethertype` bound to `ifname`; call it inside the namespace.
pub fn packet_socket(ifname: &CStr, ethertype: u16) -> OwnedFd {
    // SAFETY: plain socket creation.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW,
            i32::from(ethertype.to_be()),
        )
    };
    assert!(fd >= 0, "AF_PACKET: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: NUL-terminated name.
    let ifindex = unsafe { libc::if_nametoindex(ifname.as_ptr()) };
    assert!(ifindex > 0, "{ifname:?} missing");
    // SAFETY: zeroed sockaddr_ll is valid.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = ethertype.to_be();
    sll.sll_ifindex = ifindex as i32;
    // SAFETY: sll outlives the call; the length matches.
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    assert_eq!(r, 0, "bind: {}", std::io::Error::last_os_error());
    fd
}

/// Opens tap `ifname` through /dev/net/tun with `flags` (IFF_TAP | IFF_NO_PI [| IFF_VNET_HDR])
/// as rhyve or an orchestrator would; call it inside the namespace.
pub fn open_tap(ifname: &str, flags: libc::c_int, nonblocking: bool) -> OwnedFd {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(if nonblocking { libc::O_NONBLOCK } else { 0 })
        .open("/dev/net/tun")
        .expect("/dev/net/tun");
    // SAFETY: zeroed ifreq is valid.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in ifr.ifr_name.iter_mut().zip(ifname.as_bytes()) {
        *d = *s as libc::c_char;
    }
    ifr.ifr_ifru.ifru_flags = flags as i16;
    // SAFETY: TUNSETIFF with a valid ifreq.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), libc::TUNSETIFF, &mut ifr) };
    assert_eq!(r, 0, "TUNSETIFF: {}", std::io::Error::last_os_error());
    OwnedFd::from(f)
}

//! SIGTERM/SIGINT/SIGHUP handling on a dedicated thread (sigwait), so no async-signal
//! context ever touches VMM state. SIGTERM powers the guest off (bhyve exit status 1).

use std::sync::Arc;

use devices::{StopReason, VmControl};

const TERMINATION: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

fn sigset() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data initialised by sigemptyset/sigaddset.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in TERMINATION {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

/// Blocks the termination signals in the calling thread (and threads it spawns later).
pub fn block_termination_signals() -> std::io::Result<()> {
    let set = sigset();
    // SAFETY: valid sigset pointer; the old mask is not needed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

/// Waits for termination signals and turns them into stop requests.
pub fn spawn_signal_thread(control: Arc<VmControl>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            let set = sigset();
            let mut sig: libc::c_int = 0;
            // SAFETY: valid pointers; the signals are blocked in every thread.
            if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                continue;
            }
            log::info!("signal {sig}: powering the guest off");
            control.request_stop(StopReason::PowerOff);
        })?;
    Ok(())
}

//! The control socket's protocol, shared by its server (rhyve) and its clients (rhyvectl):
//! `RUNDIR/NAME/control.sock`, one JSON object per line each way (docs/control-protocol.md).
//! Part of the named VM object, as bhyve's /dev/vmm/NAME ioctls are part of vmm.ko.

/// The protocol version (the `version` of every request and response); bump it on
/// incompatible changes.
pub const PROTOCOL_VERSION: u64 = 1;
/// The socket's file name inside the VM's runtime directory.
pub const SOCKET_NAME: &str = "control.sock";

/// The requests the server answers, by their wire names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    Hello,
    Info,
    Stats,
    GetRegs,
    SetRegs,
    Pause,
    Resume,
    Reset,
    PowerOff,
    Nmi,
    Checkpoint,
}

impl Request {
    /// Every request, in `hello`'s order.
    pub const ALL: [Request; 11] = [
        Request::Hello,
        Request::Info,
        Request::Stats,
        Request::GetRegs,
        Request::SetRegs,
        Request::Pause,
        Request::Resume,
        Request::Reset,
        Request::PowerOff,
        Request::Nmi,
        Request::Checkpoint,
    ];

    /// The wire name.
    pub fn name(self) -> &'static str {
        match self {
            Request::Hello => "hello",
            Request::Info => "info",
            Request::Stats => "stats",
            Request::GetRegs => "get-regs",
            Request::SetRegs => "set-regs",
            Request::Pause => "pause",
            Request::Resume => "resume",
            Request::Reset => "reset",
            Request::PowerOff => "poweroff",
            Request::Nmi => "nmi",
            Request::Checkpoint => "checkpoint",
        }
    }

    /// The request called `name` on the wire.
    pub fn parse(name: &str) -> Option<Request> {
        Request::ALL.into_iter().find(|r| r.name() == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for r in Request::ALL {
            assert_eq!(Request::parse(r.name()), Some(r));
        }
        assert_eq!(Request::parse("explode"), None);
    }
}

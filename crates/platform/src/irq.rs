//! Which interrupt line each device raises (I/O APIC GSIs; ISA IRQ n is GSI n, except the
//! PIT on IRQ 0 → GSI 2 as on every PC, which KVM's default routing does).

/// The i8042's keyboard interrupt.
pub const KBD_IRQ: u32 = 1;
/// The RTC's interrupt.
pub const RTC_IRQ: u32 = 8;
/// The ACPI SCI: level-triggered, active high (the MADT's interrupt source override).
pub const SCI_GSI: u32 = 9;
/// COM1..COM4's IRQs (COM1/COM3 share 4, COM2/COM4 share 3, as on a PC).
pub const COM_IRQS: [u32; 4] = [4, 3, 4, 3];
/// The first GSI of PCI INTx; GSIs from here up to [`INTX_GSI_BASE`] + 8 are the PCI lines.
pub const INTX_GSI_BASE: u32 = 16;
/// PCI slots per bus.
pub const PCI_SLOTS: u8 = 32;

/// The GSI of PCI slot `slot`'s interrupt pin `pin`, numbered as the Interrupt Pin register
/// (1 = INTA# … 4 = INTD#): 16 + ((slot + pin − 1) mod 8), the usual swizzle, so that the
/// functions of neighbouring slots spread over eight lines. The DSDT's `_PRT` and the
/// device's interrupt line both come from here.
pub fn intx_gsi(slot: u8, pin: u8) -> Option<u32> {
    if slot >= PCI_SLOTS || !(1..=4).contains(&pin) {
        return None;
    }
    Some(INTX_GSI_BASE + (u32::from(slot) + u32::from(pin) - 1) % 8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intx_swizzle() {
        assert_eq!(intx_gsi(0, 1), Some(16));
        assert_eq!(intx_gsi(3, 1), Some(19));
        assert_eq!(intx_gsi(7, 2), Some(16));
        assert_eq!(intx_gsi(31, 4), Some(18));
        assert_eq!(intx_gsi(3, 0), None);
        assert_eq!(intx_gsi(3, 5), None);
        assert_eq!(intx_gsi(32, 1), None);
    }
}

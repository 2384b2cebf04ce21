//! Puts the loader's entry state into vCPU 0's registers.

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use loader::{EntryState, Segment};
use vmmapi::Vcpu;

fn segment(s: &Segment) -> kvm_segment {
    kvm_segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: u8::from(s.present),
        dpl: s.dpl,
        db: u8::from(s.db),
        s: u8::from(s.s),
        l: u8::from(s.l),
        g: u8::from(s.g),
        avl: 0,
        unusable: u8::from(!s.present),
        padding: 0,
    }
}

/// Writes `entry` into register sets read from a vCPU (so fields it does not cover, such as
/// the APIC base, keep KVM's values).
pub fn apply_entry_state(entry: &EntryState, regs: &mut kvm_regs, sregs: &mut kvm_sregs) {
    sregs.cs = segment(&entry.cs);
    let data = segment(&entry.data);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(&entry.tr);
    sregs.ldt = segment(&entry.ldt);
    sregs.gdt.base = entry.gdt_base;
    sregs.gdt.limit = entry.gdt_limit;
    sregs.idt.base = entry.idt_base;
    sregs.idt.limit = entry.idt_limit;
    sregs.cr0 = entry.cr0;
    sregs.cr3 = entry.cr3;
    sregs.cr4 = entry.cr4;
    sregs.efer = entry.efer;
    regs.rip = entry.rip;
    regs.rsp = entry.rsp;
    regs.rbp = entry.rsp;
    regs.rsi = entry.rsi;
    regs.rbx = entry.rbx;
    regs.rflags = entry.rflags;
}

/// Loads `entry` into the boot vCPU.
pub fn set_entry_state(vcpu: &Vcpu, entry: &EntryState) -> vmmapi::Result<()> {
    let mut sregs = vcpu.sregs()?;
    let mut regs = vcpu.regs()?;
    apply_entry_state(entry, &mut regs, &mut sregs);
    vcpu.set_sregs(&sregs)?;
    vcpu.set_regs(&regs)?;
    // x87 control word and MXCSR as after FINIT/reset, which SSE code relies on.
    let mut fpu = vcpu.fpu()?;
    fpu.fcw = 0x37f;
    fpu.mxcsr = 0x1f80;
    vcpu.set_fpu(&fpu)
}

//! The boot-state rhyveload leaves in a VM object for rhyve: the boot vCPU's entry
//! registers, the RAM size they were built for, and what was chosen (for people and
//! `rhyvectl --list`).
//!
//! Text, one `key=value` per line after a version line, values escaped (`\\`, `\n`, `\r`):
//!
//! ```text
//! rhyve-boot-state 1
//! ram_bytes=134217728
//! format=bzimage
//! source=bls
//! title=Debian GNU/Linux
//! kernel=/boot/vmlinuz-6.1.0-20-amd64
//! initrd=/boot/initrd.img-6.1.0-20-amd64
//! cmdline=root=/dev/vda1 console=ttyS0
//! rsdp=0xf2000
//! env.bootverbose=1
//! rip=0x100200
//! ...
//! cs=0x0:0xffffffff:0x10:11:1:0:0:1:1:1
//! ```
//!
//! The file lives in a directory other processes may write to: it is parsed as untrusted
//! input, every problem is a [`BootStateError`] naming the line.

use crate::{EntryState, KernelFormat, Segment};

/// Version line this module writes and accepts.
pub const HEADER: &str = "rhyve-boot-state 1";
/// Larger boot-state files are refused unread (a real one is well under 4 KiB).
pub const MAX_BYTES: usize = 1 << 20;

/// What rhyveload loaded into a VM object's RAM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootState {
    /// RAM size the kernel's memory map was built for.
    pub ram_bytes: u64,
    /// Kernel format (decides nothing in rhyve; informative).
    pub format: KernelFormat,
    /// Boot vCPU registers.
    pub entry: EntryState,
    /// Where the entry came from (e.g. `bls`, `grub`, `extlinux`, `debian-symlinks`, `host`).
    pub source: String,
    /// The boot entry's title, if it had one.
    pub title: Option<String>,
    /// Kernel path inside the guest filesystem (or host path).
    pub kernel: String,
    /// Initrd path, if any.
    pub initrd: Option<String>,
    /// The command line given to the kernel.
    pub cmdline: String,
    /// The RSDP address given to the kernel: rhyve must build its ACPI tables there.
    pub rsdp_addr: Option<u64>,
    /// Other `-e name=value` settings, recorded.
    pub env: Vec<(String, String)>,
}

/// A boot-state file that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BootStateError {
    /// too large
    #[error("boot-state is {0} bytes, more than the {MAX_BYTES} allowed")]
    TooBig(usize),
    /// wrong or missing version line
    #[error("boot-state does not start with \"{HEADER}\"")]
    BadHeader,
    /// a bad line
    #[error("boot-state line {line}: {msg}")]
    Line {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        msg: String,
    },
    /// a required key is absent
    #[error("boot-state lacks {0}=")]
    Missing(&'static str),
}

fn escape(v: &str) -> String {
    let mut o = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => o.push_str("\\\\"),
            '\n' => o.push_str("\\n"),
            '\r' => o.push_str("\\r"),
            c => o.push(c),
        }
    }
    o
}

fn unescape(v: &str) -> Result<String, String> {
    let mut o = String::with_capacity(v.len());
    let mut it = v.chars();
    while let Some(c) = it.next() {
        if c != '\\' {
            o.push(c);
            continue;
        }
        match it.next() {
            Some('\\') => o.push('\\'),
            Some('n') => o.push('\n'),
            Some('r') => o.push('\r'),
            other => return Err(format!("bad escape \\{}", other.unwrap_or(' '))),
        }
    }
    Ok(o)
}

fn format_name(f: KernelFormat) -> &'static str {
    match f {
        KernelFormat::BzImage => "bzimage",
        KernelFormat::ElfPvh => "pvh",
    }
}

fn seg_text(s: &Segment) -> String {
    format!(
        "{:#x}:{:#x}:{:#x}:{}:{}:{}:{}:{}:{}:{}",
        s.base,
        s.limit,
        s.selector,
        s.type_,
        u8::from(s.present),
        s.dpl,
        u8::from(s.db),
        u8::from(s.s),
        u8::from(s.l),
        u8::from(s.g)
    )
}

fn num(v: &str) -> Result<u64, String> {
    let r = match v.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16),
        None => v.parse(),
    };
    r.map_err(|_| format!("{v:?} is not a number"))
}

fn narrow<T: TryFrom<u64>>(v: &str) -> Result<T, String> {
    T::try_from(num(v)?).map_err(|_| format!("{v} is out of range"))
}

fn flag(v: &str) -> Result<bool, String> {
    match v {
        "0" => Ok(false),
        "1" => Ok(true),
        _ => Err(format!("{v:?} is not 0 or 1")),
    }
}

fn parse_seg(v: &str) -> Result<Segment, String> {
    let f: Vec<&str> = v.split(':').collect();
    let [base, limit, sel, ty, p, dpl, db, s, l, g] = f[..] else {
        return Err(format!("segment {v:?} needs 10 ':'-separated fields"));
    };
    Ok(Segment {
        base: num(base)?,
        limit: narrow(limit)?,
        selector: narrow(sel)?,
        type_: narrow(ty)?,
        present: flag(p)?,
        dpl: narrow(dpl)?,
        db: flag(db)?,
        s: flag(s)?,
        l: flag(l)?,
        g: flag(g)?,
    })
}

impl BootState {
    /// The file's text.
    pub fn to_text(&self) -> String {
        let e = &self.entry;
        let mut lines = vec![
            HEADER.to_string(),
            format!("ram_bytes={}", self.ram_bytes),
            format!("format={}", format_name(self.format)),
            format!("source={}", escape(&self.source)),
        ];
        if let Some(t) = &self.title {
            lines.push(format!("title={}", escape(t)));
        }
        lines.push(format!("kernel={}", escape(&self.kernel)));
        if let Some(i) = &self.initrd {
            lines.push(format!("initrd={}", escape(i)));
        }
        lines.push(format!("cmdline={}", escape(&self.cmdline)));
        if let Some(r) = self.rsdp_addr {
            lines.push(format!("rsdp={r:#x}"));
        }
        for (k, v) in &self.env {
            lines.push(format!("env.{}={}", escape(k), escape(v)));
        }
        for (k, v) in [
            ("rip", e.rip),
            ("rsp", e.rsp),
            ("rsi", e.rsi),
            ("rbx", e.rbx),
            ("rflags", e.rflags),
            ("cr0", e.cr0),
            ("cr3", e.cr3),
            ("cr4", e.cr4),
            ("efer", e.efer),
            ("gdt_base", e.gdt_base),
            ("gdt_limit", u64::from(e.gdt_limit)),
            ("idt_base", e.idt_base),
            ("idt_limit", u64::from(e.idt_limit)),
        ] {
            lines.push(format!("{k}={v:#x}"));
        }
        for (k, s) in [
            ("cs", &e.cs),
            ("data", &e.data),
            ("tr", &e.tr),
            ("ldt", &e.ldt),
        ] {
            lines.push(format!("{k}={}", seg_text(s)));
        }
        let mut t = lines.join("\n");
        t.push('\n');
        t
    }

    /// Parses [`BootState::to_text`]'s output; every key but `title`, `initrd` and `env.*`
    /// is required, unknown or repeated keys are errors.
    pub fn parse(text: &str) -> Result<Self, BootStateError> {
        if text.len() > MAX_BYTES {
            return Err(BootStateError::TooBig(text.len()));
        }
        let mut lines = text.lines().enumerate();
        match lines.next() {
            Some((_, h)) if h.trim_end() == HEADER => {}
            _ => return Err(BootStateError::BadHeader),
        }
        let mut seen = std::collections::BTreeMap::<String, String>::new();
        let mut env = Vec::new();
        for (i, raw) in lines {
            let line = i + 1;
            let bad = |msg: String| BootStateError::Line { line, msg };
            if raw.trim().is_empty() {
                continue;
            }
            let (k, v) = raw
                .split_once('=')
                .ok_or_else(|| bad(format!("{raw:?} is not key=value")))?;
            let v = unescape(v).map_err(&bad)?;
            if let Some(name) = k.strip_prefix("env.") {
                env.push((unescape(name).map_err(&bad)?, v));
                continue;
            }
            const KEYS: &[&str] = &[
                "ram_bytes",
                "format",
                "source",
                "title",
                "kernel",
                "initrd",
                "cmdline",
                "rsdp",
                "rip",
                "rsp",
                "rsi",
                "rbx",
                "rflags",
                "cr0",
                "cr3",
                "cr4",
                "efer",
                "gdt_base",
                "gdt_limit",
                "idt_base",
                "idt_limit",
                "cs",
                "data",
                "tr",
                "ldt",
            ];
            if !KEYS.contains(&k) {
                return Err(bad(format!("unknown key {k:?}")));
            }
            // Check each value as it comes, so errors name its line.
            let check = match k {
                "format" => match v.as_str() {
                    "bzimage" | "pvh" => Ok(()),
                    _ => Err(format!("unknown format {v:?}")),
                },
                "cs" | "data" | "tr" | "ldt" => parse_seg(&v).map(|_| ()),
                "gdt_limit" | "idt_limit" => narrow::<u16>(&v).map(|_| ()),
                "source" | "title" | "kernel" | "initrd" | "cmdline" => Ok(()),
                _ => num(&v).map(|_| ()),
            };
            check.map_err(|m| bad(format!("{k}: {m}")))?;
            if seen.insert(k.to_string(), v).is_some() {
                return Err(bad(format!("{k}= given twice")));
            }
        }
        let get = |k: &'static str| seen.get(k).ok_or(BootStateError::Missing(k));
        // Values were checked above; a failure here would be a bug, reported as missing.
        let n =
            |k: &'static str| get(k).and_then(|v| num(v).map_err(|_| BootStateError::Missing(k)));
        let seg = |k: &'static str| {
            get(k).and_then(|v| parse_seg(v).map_err(|_| BootStateError::Missing(k)))
        };
        let small = |k: &'static str| {
            get(k).and_then(|v| narrow::<u16>(v).map_err(|_| BootStateError::Missing(k)))
        };
        let ram_bytes = n("ram_bytes")?;
        if ram_bytes == 0 {
            return Err(BootStateError::Missing("ram_bytes"));
        }
        Ok(BootState {
            ram_bytes,
            format: if get("format")? == "pvh" {
                KernelFormat::ElfPvh
            } else {
                KernelFormat::BzImage
            },
            entry: EntryState {
                rip: n("rip")?,
                rsp: n("rsp")?,
                rsi: n("rsi")?,
                rbx: n("rbx")?,
                rflags: n("rflags")?,
                cr0: n("cr0")?,
                cr3: n("cr3")?,
                cr4: n("cr4")?,
                efer: n("efer")?,
                cs: seg("cs")?,
                data: seg("data")?,
                tr: seg("tr")?,
                ldt: seg("ldt")?,
                gdt_base: n("gdt_base")?,
                gdt_limit: small("gdt_limit")?,
                idt_base: n("idt_base")?,
                idt_limit: small("idt_limit")?,
            },
            source: get("source")?.clone(),
            title: seen.get("title").cloned(),
            kernel: get("kernel")?.clone(),
            initrd: seen.get("initrd").cloned(),
            cmdline: get("cmdline")?.clone(),
            rsdp_addr: match seen.get("rsdp") {
                Some(v) => Some(num(v).map_err(|_| BootStateError::Missing("rsdp"))?),
                None => None,
            },
            env,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> BootState {
        BootState {
            ram_bytes: 128 << 20,
            format: KernelFormat::BzImage,
            entry: crate::entry::long_mode(0x10_0200, 0x7000),
            source: "bls".into(),
            title: Some("Debian GNU/Linux, with \\ and\nnewline".into()),
            kernel: "/boot/vmlinuz-6.1".into(),
            initrd: Some("/boot/initrd.img-6.1".into()),
            cmdline: "root=/dev/vda1 quote=\"a b\"".into(),
            rsdp_addr: Some(0xf_2000),
            env: vec![("bootverbose".into(), "1".into())],
        }
    }

    #[test]
    fn round_trips() {
        for s in [
            sample(),
            BootState {
                format: KernelFormat::ElfPvh,
                entry: crate::entry::pvh(0x100_0850, 0x1000),
                title: None,
                initrd: None,
                rsdp_addr: None,
                env: vec![],
                ..sample()
            },
        ] {
            let t = s.to_text();
            assert!(
                t.starts_with("rhyve-boot-state 1\nram_bytes=134217728\n"),
                "{t}"
            );
            assert_eq!(BootState::parse(&t).unwrap(), s);
        }
    }

    #[test]
    fn bad_files_are_errors() {
        let good = sample().to_text();
        assert_eq!(BootState::parse(""), Err(BootStateError::BadHeader));
        assert_eq!(
            BootState::parse("rhyve-boot-state 2\n"),
            Err(BootStateError::BadHeader)
        );
        let without_rip: String = good
            .lines()
            .filter(|l| !l.starts_with("rip="))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(
            BootState::parse(&without_rip),
            Err(BootStateError::Missing("rip"))
        );
        let cases = [
            ("rip=zzz", "rip: \"zzz\" is not a number"),
            ("gdt_limit=0x10000", "gdt_limit: 0x10000 is out of range"),
            ("cs=1:2:3", "needs 10"),
            ("cs=0:0:0:0:2:0:0:0:0:0", "not 0 or 1"),
            ("format=pe", "unknown format"),
            ("what=1", "unknown key"),
            ("garbage", "is not key=value"),
            ("rsp=0x1", "given twice"),
            ("cmdline=\\x", "bad escape"),
        ];
        for (line, want) in cases {
            let t = format!("{good}{line}\n");
            let e = BootState::parse(&t).unwrap_err().to_string();
            assert!(e.contains(want), "{line}: {e}");
            assert!(e.starts_with("boot-state line "), "{e}");
        }
        let huge = format!("{good}{}", "x".repeat(MAX_BYTES));
        assert!(matches!(
            BootState::parse(&huge),
            Err(BootStateError::TooBig(_))
        ));
    }
}

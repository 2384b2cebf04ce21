//! extlinux.conf / syslinux.cfg: DEFAULT, LABEL, MENU LABEL, MENU DEFAULT, KERNEL/LINUX,
//! INITRD, APPEND (a global APPEND applies to labels without their own; `initrd=` inside APPEND
//! names the initrd when there is no INITRD line). INCLUDE and UI modules are not followed.

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Label {
    pub name: String,
    pub title: Option<String>,
    pub kernel: Option<String>,
    pub initrd: Vec<String>,
    /// The command line without `initrd=`.
    pub append: String,
    menu_default: bool,
}

#[derive(Debug, Default)]
pub struct Config {
    pub labels: Vec<Label>,
    pub default: Option<String>,
}

const MAX_LABELS: usize = 1024;

fn split_initrds(s: &str) -> Vec<String> {
    s.split(',')
        .filter(|p| !p.is_empty())
        .map(str::to_string)
        .collect()
}

pub fn parse(text: &str) -> Config {
    let mut cfg = Config::default();
    let mut global_append: Option<String> = None;
    // Per label: its own APPEND, if any (None → the global one).
    let mut appends: Vec<Option<String>> = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (kw, rest) = match line.split_once(|c: char| c.is_ascii_whitespace()) {
            Some((k, r)) => (k.to_ascii_lowercase(), r.trim()),
            None => (line.to_ascii_lowercase(), ""),
        };
        if kw == "default" {
            cfg.default = Some(rest.to_string());
            continue;
        }
        if kw == "label" {
            if cfg.labels.len() < MAX_LABELS {
                cfg.labels.push(Label {
                    name: rest.to_string(),
                    ..Default::default()
                });
                appends.push(None);
            }
            continue;
        }
        let cur = cfg.labels.last_mut();
        match (kw.as_str(), cur) {
            ("menu", Some(l)) => {
                let (sub, arg) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
                match sub.to_ascii_lowercase().as_str() {
                    "label" => l.title = Some(arg.trim().replace('^', "")),
                    "default" => l.menu_default = true,
                    _ => {}
                }
            }
            ("kernel" | "linux", Some(l)) => l.kernel = Some(rest.to_string()),
            ("initrd", Some(l)) => l.initrd = split_initrds(rest),
            ("append", Some(_)) => {
                if let Some(a) = appends.last_mut() {
                    *a = Some(rest.to_string());
                }
            }
            ("append", None) => global_append = Some(rest.to_string()),
            _ => {}
        }
    }
    for (l, a) in cfg.labels.iter_mut().zip(appends) {
        let a = a.or_else(|| global_append.clone()).unwrap_or_default();
        let a = if a == "-" { String::new() } else { a };
        let mut kept = Vec::new();
        for w in a.split_whitespace() {
            match w.strip_prefix("initrd=") {
                Some(v) if l.initrd.is_empty() => l.initrd = split_initrds(v),
                Some(_) => {}
                None => kept.push(w),
            }
        }
        l.append = kept.join(" ");
    }
    cfg
}

impl Config {
    /// DEFAULT when it names a label, else the MENU DEFAULT label, else the first label.
    pub fn default_index(&self) -> usize {
        self.default
            .as_deref()
            .and_then(|d| self.labels.iter().position(|l| l.name == d))
            .or_else(|| self.labels.iter().position(|l| l.menu_default))
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_default_and_initrd_in_append() {
        let c = parse(
            "# x\nUI menu.c32\nDEFAULT rescue\nAPPEND console=ttyS0\nLABEL linux\n  MENU LABEL ^Linux 6.1\n  KERNEL /vmlinuz\n  APPEND root=/dev/vda1 initrd=/a.img,/b.img ro\nlabel rescue\n linux ../vmlinuz-r\n initrd /r.img\n append root=/dev/vda1 initrd=/ignored single\nLABEL plain\n KERNEL /k\n",
        );
        assert_eq!(c.labels.len(), 3);
        assert_eq!(c.default_index(), 1);
        let l = &c.labels[0];
        assert_eq!(l.title.as_deref(), Some("Linux 6.1"));
        assert_eq!(l.initrd, vec!["/a.img", "/b.img"]);
        assert_eq!(l.append, "root=/dev/vda1 ro");
        assert_eq!(c.labels[1].initrd, vec!["/r.img"]);
        assert_eq!(c.labels[1].append, "root=/dev/vda1 single");
        assert_eq!(c.labels[2].append, "console=ttyS0", "global APPEND");
    }

    #[test]
    fn random_configs_never_panic() {
        let toks = [
            "LABEL ", "label", "DEFAULT ", "MENU ", "LABEL", "DEFAULT", "KERNEL ", "LINUX ",
            "INITRD ", "APPEND ", "initrd=", ",", "-", "\n", " ", "\t", "a", "/k", "#", "é",
        ];
        for seed in 0..3000 {
            let c = parse(&crate::random_config(seed, &toks, 50));
            assert!(c.labels.is_empty() || c.default_index() < c.labels.len());
        }
    }

    #[test]
    fn menu_default_and_fallbacks() {
        let c =
            parse("DEFAULT vesamenu.c32\nLABEL a\nKERNEL /a\nLABEL b\nMENU DEFAULT\nKERNEL /b\n");
        assert_eq!(c.default_index(), 1);
        let c = parse("LABEL a\nKERNEL /a\nAPPEND -\n");
        assert_eq!(c.default_index(), 0);
        assert_eq!(c.labels[0].append, "");
        assert!(parse("").labels.is_empty());
    }
}

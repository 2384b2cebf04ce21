//! Boot Loader Specification type #1 entries (`loader/entries/*.conf`): parsing, the spec's
//! sort order, and the `default` glob of `loader/loader.conf`.

use std::cmp::Ordering;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlsEntry {
    /// File name without ".conf".
    pub id: String,
    pub title: Option<String>,
    pub version: Option<String>,
    pub machine_id: Option<String>,
    pub sort_key: Option<String>,
    pub linux: Option<String>,
    pub initrd: Vec<String>,
    pub options: Vec<String>,
}

/// Parses one entry file: "key value" lines, '#' comments; `initrd` and `options` may repeat.
pub fn parse(id: &str, text: &str) -> BlsEntry {
    let mut e = BlsEntry {
        id: id.to_string(),
        ..Default::default()
    };
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, value) = match line.split_once(|c: char| c.is_ascii_whitespace()) {
            Some((k, v)) => (k, v.trim().to_string()),
            None => (line, String::new()),
        };
        match key {
            "title" => e.title = Some(value),
            "version" => e.version = Some(value),
            "machine-id" => e.machine_id = Some(value),
            "sort-key" => e.sort_key = Some(value),
            "linux" => e.linux = Some(value),
            // One path per line, which may contain spaces (the spec; systemd-boot agrees).
            "initrd" if !value.is_empty() => e.initrd.push(value),
            "options" => e.options.push(value),
            _ => {}
        }
    }
    e
}

/// systemd's version comparison (strverscmp_improved), simplified: '~' sorts before anything,
/// runs of digits compare numerically, letters compare alphabetically and before digits,
/// other separators are skipped.
pub fn version_cmp(a: &str, b: &str) -> Ordering {
    let (mut a, mut b) = (a.as_bytes(), b.as_bytes());
    loop {
        let skip = |s: &[u8]| -> usize {
            s.iter()
                .take_while(|c| !c.is_ascii_alphanumeric() && **c != b'~')
                .count()
        };
        a = &a[skip(a)..];
        b = &b[skip(b)..];
        match (a.first(), b.first()) {
            (None, None) => return Ordering::Equal,
            (Some(b'~'), Some(b'~')) => {
                a = &a[1..];
                b = &b[1..];
                continue;
            }
            (Some(b'~'), _) => return Ordering::Less,
            (_, Some(b'~')) => return Ordering::Greater,
            (None, _) => return Ordering::Less,
            (_, None) => return Ordering::Greater,
            _ => {}
        }
        let (ad, bd) = (a[0].is_ascii_digit(), b[0].is_ascii_digit());
        if ad != bd {
            return if ad {
                Ordering::Greater
            } else {
                Ordering::Less
            };
        }
        let run = |s: &[u8], digit: bool| {
            s.iter()
                .take_while(|c| {
                    if digit {
                        c.is_ascii_digit()
                    } else {
                        c.is_ascii_alphabetic()
                    }
                })
                .count()
        };
        let (na, nb) = (run(a, ad), run(b, bd));
        let (ra, rb) = (&a[..na], &b[..nb]);
        let ord = if ad {
            let strip = |r: &[u8]| -> usize { r.iter().take_while(|c| **c == b'0').count() };
            let (ta, tb) = (&ra[strip(ra)..], &rb[strip(rb)..]);
            ta.len().cmp(&tb.len()).then_with(|| ta.cmp(tb))
        } else {
            ra.cmp(rb)
        };
        if ord != Ordering::Equal {
            return ord;
        }
        a = &a[na..];
        b = &b[nb..];
    }
}

/// The spec's order: entries with a sort-key first, by sort-key, machine-id (ascending) and
/// version (descending); then the rest by file name, descending version order.
pub fn sort(entries: &mut [BlsEntry]) {
    entries.sort_by(|x, y| {
        let by_keys = match (&x.sort_key, &y.sort_key) {
            (Some(a), Some(b)) => a
                .cmp(b)
                .then_with(|| x.machine_id.cmp(&y.machine_id))
                .then_with(|| match (&x.version, &y.version) {
                    (Some(a), Some(b)) => version_cmp(b, a),
                    _ => Ordering::Equal,
                }),
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (None, None) => Ordering::Equal,
        };
        by_keys.then_with(|| version_cmp(&y.id, &x.id))
    });
}

/// The `default` glob from loader.conf, if any.
pub fn loader_conf_default(text: &str) -> Option<String> {
    text.lines().find_map(|l| {
        let mut it = l.split_whitespace();
        (it.next() == Some("default"))
            .then(|| it.next().map(str::to_string))
            .flatten()
    })
}

/// Shell-style glob with `*` and `?` (all loader.conf needs).
pub fn glob_match(pat: &str, s: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pat.chars().collect(), s.chars().collect());
    // Iterative matcher with one backtrack point: linear time on hostile patterns.
    let (mut pi, mut ti, mut star, mut mark) = (0, 0, None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(sp) = star {
            pi = sp + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_keys_and_repeats() {
        let e = parse(
            "fedora-6.5",
            "# comment\ntitle Fedora Linux\nversion 6.5.0\nlinux /vmlinuz-6.5\ninitrd /a.img\ninitrd /b c.img\noptions root=UUID=x ro\noptions quiet\n",
        );
        assert_eq!(e.title.as_deref(), Some("Fedora Linux"));
        assert_eq!(e.linux.as_deref(), Some("/vmlinuz-6.5"));
        assert_eq!(e.initrd, vec!["/a.img", "/b c.img"]);
        assert_eq!(e.options.join(" "), "root=UUID=x ro quiet");
    }

    #[test]
    fn version_ordering() {
        assert_eq!(version_cmp("6.10.0", "6.9.0"), Ordering::Greater);
        assert_eq!(version_cmp("6.1.0-rc1", "6.1.0"), Ordering::Greater);
        assert_eq!(version_cmp("1.0~rc1", "1.0"), Ordering::Less);
        assert_eq!(version_cmp("007", "7"), Ordering::Equal);
        assert_eq!(version_cmp("a", "1"), Ordering::Less);
    }

    #[test]
    fn spec_sort_order() {
        let mk = |id: &str, sk: Option<&str>, v: Option<&str>| BlsEntry {
            id: id.into(),
            sort_key: sk.map(Into::into),
            version: v.map(Into::into),
            ..Default::default()
        };
        let mut v = vec![
            mk("zzz-nosort", None, None),
            mk("linux-6.9", None, None),
            mk("linux-6.10", None, None),
            mk("fedora-old", Some("fedora"), Some("6.1")),
            mk("fedora-new", Some("fedora"), Some("6.10")),
            mk("arch", Some("arch"), Some("1")),
        ];
        sort(&mut v);
        let ids: Vec<_> = v.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(
            ids,
            [
                "arch",
                "fedora-new",
                "fedora-old",
                "zzz-nosort",
                "linux-6.10",
                "linux-6.9"
            ]
        );
    }

    #[test]
    fn random_entries_and_versions_never_panic() {
        let toks = [
            "title ",
            "version ",
            "linux ",
            "initrd ",
            "options ",
            "sort-key ",
            "machine-id ",
            "\n",
            " ",
            "~",
            "1",
            "09",
            "a",
            ".",
            "-",
            "^",
            "#",
            "é",
            "*",
            "?",
        ];
        let mut all = Vec::new();
        for seed in 0..2000 {
            let text = crate::random_config(seed, &toks, 30);
            let e = parse(
                &text.chars().take(12).collect::<String>().replace('\n', ""),
                &text,
            );
            let _ = glob_match(&text.chars().take(8).collect::<String>(), &text);
            all.push(e);
        }
        sort(&mut all);
        for w in all.windows(2) {
            let _ = version_cmp(&w[0].id, &w[1].id);
        }
    }

    #[test]
    fn loader_conf_and_glob() {
        assert_eq!(
            loader_conf_default("timeout 3\ndefault debian-*\n").as_deref(),
            Some("debian-*")
        );
        assert!(glob_match("debian-*", "debian-6.1"));
        assert!(glob_match("*6.?", "debian-6.1"));
        assert!(!glob_match("fedora*", "debian-6.1"));
        assert!(!glob_match(&"*a".repeat(50), &"a".repeat(40)));
    }
}

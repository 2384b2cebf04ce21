//! A GRUB 2 `grub.cfg` reader: just enough of the script language to find the menu entries
//! and the default one. `set`, `$var`/`${var}` substitution, quoting, `;` and `\` are
//! understood; `if`/`else`/`fi` are not evaluated (the commands in every branch run in order,
//! which gives the usual `set default=...` result); functions are skipped; `search`,
//! `insmod` and the like are ignored (paths are taken relative to the partition holding
//! grub.cfg). Submenus are flattened: their entries are listed after the entries before them,
//! with GRUB's "N>M" index kept for `set default="1>2"`.

use std::collections::HashMap;

/// A piece of a word: literal text or a variable reference (expanded when the command runs).
#[derive(Debug, Clone, PartialEq)]
enum Part {
    Lit(String),
    Var(String),
}
type Word = Vec<Part>;
type Command = Vec<Word>;

/// Bounds against hostile configs.
const MAX_ENTRIES: usize = 1024;
const MAX_DEPTH: usize = 8;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrubEntry {
    pub title: String,
    /// "Submenu title>Entry title" for entries in submenus, else the title.
    pub title_path: String,
    pub id: Option<String>,
    /// GRUB's index: "3", or "1>2" inside a submenu.
    pub index_path: String,
    pub linux: Option<String>,
    pub args: String,
    pub initrd: Vec<String>,
}

#[derive(Debug, Default)]
pub struct GrubMenu {
    pub entries: Vec<GrubEntry>,
    /// The value of `default` after running the script ("" when unset).
    pub default: String,
    pub vars: HashMap<String, String>,
}

/// Splits the script into commands of words. Newlines and unquoted ';' end a command,
/// '#' at the start of a word starts a comment, '\' escapes, quotes may span lines.
fn lex(text: &str) -> Vec<Command> {
    let mut cmds = Vec::new();
    let mut cmd: Command = Vec::new();
    let mut word: Word = Vec::new();
    let mut lit = String::new();
    let mut in_word = false;
    let mut chars = text.chars().peekable();

    fn flush_lit(lit: &mut String, word: &mut Word) {
        if !lit.is_empty() {
            word.push(Part::Lit(std::mem::take(lit)));
        }
    }
    fn read_var(chars: &mut std::iter::Peekable<std::str::Chars>) -> Option<String> {
        let mut name = String::new();
        if chars.peek() == Some(&'{') {
            chars.next();
            for c in chars.by_ref() {
                if c == '}' {
                    return Some(name);
                }
                name.push(c);
            }
            return Some(name);
        }
        while let Some(&c) = chars.peek() {
            if c.is_ascii_alphanumeric() || c == '_' {
                name.push(c);
                chars.next();
            } else {
                break;
            }
        }
        if name.is_empty() {
            if let Some(&c) = chars.peek() {
                if matches!(c, '?' | '@' | '#' | '*') {
                    chars.next();
                    return Some(c.to_string());
                }
            }
            return None;
        }
        Some(name)
    }

    while let Some(c) = chars.next() {
        match c {
            '#' if !in_word => {
                for c in chars.by_ref() {
                    if c == '\n' {
                        break;
                    }
                }
                if !cmd.is_empty() {
                    cmds.push(std::mem::take(&mut cmd));
                }
            }
            '\n' | ';' => {
                if in_word {
                    flush_lit(&mut lit, &mut word);
                    cmd.push(std::mem::take(&mut word));
                    in_word = false;
                }
                if !cmd.is_empty() {
                    cmds.push(std::mem::take(&mut cmd));
                }
            }
            c if c.is_whitespace() => {
                if in_word {
                    flush_lit(&mut lit, &mut word);
                    cmd.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            '\\' => {
                in_word = true;
                match chars.next() {
                    Some('\n') | None => {}
                    Some(n) => lit.push(n),
                }
            }
            '\'' => {
                in_word = true;
                for c in chars.by_ref() {
                    if c == '\'' {
                        break;
                    }
                    lit.push(c);
                }
            }
            '"' => {
                in_word = true;
                while let Some(c) = chars.next() {
                    match c {
                        '"' => break,
                        '\\' => match chars.next() {
                            Some(n @ ('"' | '\\' | '$')) => lit.push(n),
                            Some('\n') | None => {}
                            Some(n) => {
                                lit.push('\\');
                                lit.push(n);
                            }
                        },
                        '$' => match read_var(&mut chars) {
                            Some(v) => {
                                flush_lit(&mut lit, &mut word);
                                word.push(Part::Var(v));
                            }
                            None => lit.push('$'),
                        },
                        c => lit.push(c),
                    }
                }
            }
            '$' => {
                in_word = true;
                match read_var(&mut chars) {
                    Some(v) => {
                        flush_lit(&mut lit, &mut word);
                        word.push(Part::Var(v));
                    }
                    None => lit.push('$'),
                }
            }
            c => {
                in_word = true;
                lit.push(c);
            }
        }
    }
    if in_word {
        flush_lit(&mut lit, &mut word);
        cmd.push(word);
    }
    if !cmd.is_empty() {
        cmds.push(cmd);
    }
    split_braces(cmds)
}

/// "menuentry x { linux /k ; }" on one line: a "{" word ends its command and a "}" word is a
/// command of its own, so blocks look the same however they are laid out.
fn split_braces(cmds: Vec<Command>) -> Vec<Command> {
    let mut out = Vec::new();
    for c in cmds {
        let mut cur: Command = Vec::new();
        for w in c {
            match literal(&w) {
                Some("{") => {
                    cur.push(w);
                    out.push(std::mem::take(&mut cur));
                }
                Some("}") => {
                    if !cur.is_empty() {
                        out.push(std::mem::take(&mut cur));
                    }
                    out.push(vec![w]);
                }
                _ => cur.push(w),
            }
        }
        if !cur.is_empty() {
            out.push(cur);
        }
    }
    out
}

fn expand(w: &Word, vars: &HashMap<String, String>) -> String {
    w.iter()
        .map(|p| match p {
            Part::Lit(s) => s.as_str(),
            Part::Var(v) => vars.get(v).map(String::as_str).unwrap_or(""),
        })
        .collect()
}

/// The literal text of a word, if it has no variables (keywords must be literal).
fn literal(w: &Word) -> Option<&str> {
    match w.as_slice() {
        [Part::Lit(s)] => Some(s.as_str()),
        _ => None,
    }
}

fn opens_block(c: &Command) -> bool {
    c.last().and_then(literal) == Some("{")
}
fn closes_block(c: &Command) -> bool {
    c.len() == 1 && literal(&c[0]) == Some("}")
}

/// Returns the commands of the block opened at `cmds[start]` and the index after its "}".
fn block(cmds: &[Command], start: usize) -> (&[Command], usize) {
    let mut depth = 0usize;
    for (i, c) in cmds.iter().enumerate().skip(start) {
        if opens_block(c) {
            depth += 1;
        } else if closes_block(c) {
            depth = depth.saturating_sub(1);
            if depth == 0 {
                return (&cmds[start + 1..i], i + 1);
            }
        }
    }
    (&cmds[(start + 1).min(cmds.len())..], cmds.len())
}

/// Parses `grubenv` ("key=value" lines after a comment header) into variables.
pub fn parse_grubenv(text: &str) -> HashMap<String, String> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Strips a GRUB device prefix: "(hd0,gpt2)/vmlinuz" → "/vmlinuz".
fn strip_device(p: &str) -> String {
    if p.starts_with('(') {
        if let Some(i) = p.find(')') {
            return p[i + 1..].to_string();
        }
    }
    p.to_string()
}

struct Runner {
    vars: HashMap<String, String>,
    entries: Vec<GrubEntry>,
}

impl Runner {
    fn set(&mut self, cmd: &Command) {
        for w in cmd.iter().skip(1) {
            let s = expand(w, &self.vars);
            if let Some((k, v)) = s.split_once('=') {
                self.assign(k, v);
            }
        }
    }

    fn assign(&mut self, k: &str, v: &str) {
        // grub-mkconfig sets this to "--id" or "" inside an `if` we do not evaluate; every
        // GRUB 2 since 2.00 has the feature, so keep it fixed rather than let the else win.
        if k != "menuentry_id_option" {
            self.vars.insert(k.to_string(), v.to_string());
        }
    }

    /// `name=value` as a command is an assignment too.
    fn bare_assignment(&mut self, cmd: &[Word]) {
        if let [w] = cmd {
            if let Some(Part::Lit(first)) = w.first() {
                if let Some((k, _)) = first.split_once('=') {
                    if !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                        let s = expand(w, &self.vars);
                        if let Some((k, v)) = s.split_once('=') {
                            self.assign(k, v);
                        }
                    }
                }
            }
        }
    }

    /// Runs a list of commands; `prefix` is the submenu's index/title path.
    fn run(&mut self, cmds: &[Command], depth: usize, prefix: Option<(&str, &str)>) {
        let mut i = 0;
        let mut item = 0usize;
        while i < cmds.len() && self.entries.len() < MAX_ENTRIES {
            let mut cmd: &[Word] = &cmds[i];
            // "then set x=1" / "else set x=2": drop the keyword, run the rest.
            while let Some(k) = cmd.first().and_then(literal) {
                if matches!(k, "then" | "else" | "do") {
                    cmd = &cmd[1..];
                } else {
                    break;
                }
            }
            let name = cmd.first().and_then(literal).unwrap_or("");
            match name {
                "menuentry" | "submenu" | "function" if opens_block(&cmds[i]) => {
                    let (body, next) = block(cmds, i);
                    if name == "menuentry" {
                        self.entry(cmd, body, &index_path(prefix, item), prefix);
                        item += 1;
                    } else if name == "submenu" && depth < MAX_DEPTH {
                        let title = self.title_and_id(cmd).0;
                        let idx = index_path(prefix, item);
                        let tpath = match prefix {
                            Some((_, t)) => format!("{t}>{title}"),
                            None => title,
                        };
                        self.run(body, depth + 1, Some((&idx, &tpath)));
                        item += 1;
                    }
                    i = next;
                    continue;
                }
                "set" => self.set(&cmd.to_vec()),
                _ => self.bare_assignment(cmd),
            }
            i += 1;
        }
    }

    fn title_and_id(&self, cmd: &[Word]) -> (String, Option<String>) {
        let words: Vec<String> = cmd.iter().skip(1).map(|w| expand(w, &self.vars)).collect();
        let (mut title, mut id) = (None, None);
        let mut k = 0;
        while k < words.len() {
            let w = &words[k];
            if w == "{" {
                break;
            }
            if let Some(v) = w.strip_prefix("--id=") {
                id = Some(v.to_string());
            } else if w == "--id" {
                id = words.get(k + 1).cloned();
                k += 1;
            } else if w == "--unrestricted" {
            } else if w.starts_with("--") {
                if !w.contains('=') {
                    k += 1; // --class X, --users X, --hotkey X
                }
            } else if title.is_none() {
                title = Some(w.clone());
            }
            k += 1;
        }
        (title.unwrap_or_default(), id)
    }

    fn entry(&mut self, cmd: &[Word], body: &[Command], index: &str, prefix: Option<(&str, &str)>) {
        let (title, id) = self.title_and_id(cmd);
        let mut e = GrubEntry {
            title_path: match prefix {
                Some((_, t)) => format!("{t}>{title}"),
                None => title.clone(),
            },
            title,
            id,
            index_path: index.to_string(),
            linux: None,
            args: String::new(),
            initrd: Vec::new(),
        };
        // Variables set inside an entry are local to it when it runs.
        let saved = self.vars.clone();
        for c in body {
            let mut c: &[Word] = c;
            while let Some(k) = c.first().and_then(literal) {
                if matches!(k, "then" | "else" | "do") {
                    c = &c[1..];
                } else {
                    break;
                }
            }
            let words: Vec<String> = c.iter().map(|w| expand(w, &self.vars)).collect();
            match words.first().map(String::as_str) {
                Some("linux" | "linux16" | "linuxefi") if words.len() > 1 => {
                    e.linux = Some(strip_device(&words[1]));
                    e.args = words[2..]
                        .iter()
                        .filter(|w| !w.is_empty())
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(" ");
                }
                Some("initrd" | "initrd16" | "initrdefi") => {
                    e.initrd = words[1..]
                        .iter()
                        .filter(|w| !w.is_empty())
                        .map(|w| strip_device(w))
                        .collect();
                }
                Some("set") => self.set(&c.to_vec()),
                _ => {}
            }
        }
        self.vars = saved;
        self.entries.push(e);
    }
}

fn index_path(prefix: Option<(&str, &str)>, item: usize) -> String {
    match prefix {
        Some((p, _)) => format!("{p}>{item}"),
        None => item.to_string(),
    }
}

/// Runs grub.cfg with `env` (from grubenv) preloaded.
pub fn parse(text: &str, mut env: HashMap<String, String>) -> GrubMenu {
    let cmds = lex(text);
    env.insert("menuentry_id_option".into(), "--id".into());
    let mut r = Runner {
        vars: env,
        entries: Vec::new(),
    };
    r.run(&cmds, 0, None);
    GrubMenu {
        default: r.vars.get("default").cloned().unwrap_or_default(),
        entries: r.entries,
        vars: r.vars,
    }
}

impl GrubMenu {
    /// Index into `entries` of the entry named by `sel`: a GRUB index ("2", "1>0"), a title,
    /// a "Submenu>Title" path, or an id. A bare index naming a submenu picks its first entry.
    pub fn find(&self, sel: &str) -> Option<usize> {
        let sel = sel.trim();
        if sel
            .split('>')
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        {
            let exact = self.entries.iter().position(|e| e.index_path == sel);
            return exact.or_else(|| {
                let pre = format!("{sel}>");
                self.entries
                    .iter()
                    .position(|e| e.index_path.starts_with(&pre))
            });
        }
        self.entries
            .iter()
            .position(|e| e.id.as_deref() == Some(sel) || e.title_path == sel)
            .or_else(|| self.entries.iter().position(|e| e.title == sel))
    }

    /// The entry GRUB would boot: `default` (with "saved" meaning `saved_entry`), else the first.
    pub fn default_index(&self) -> usize {
        let mut d = self.default.clone();
        if d == "saved" {
            d = self.vars.get("saved_entry").cloned().unwrap_or_default();
        }
        if d.is_empty() {
            return 0;
        }
        self.find(&d).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEBIANISH: &str = r#"
# comment
if [ -s $prefix/grubenv ]; then
  set have_grubenv=true
  load_env
fi
if [ "${next_entry}" ] ; then
   set default="${next_entry}"
   set next_entry=
else
   set default="2"
fi
if [ x"${feature_menuentry_id}" = xy ]; then
  menuentry_id_option="--id"
else
  menuentry_id_option=""
fi
function load_video {
  if [ x$feature_all_video_module = xy ]; then
    insmod all_video
  fi
}
set kver=6.1.0-13-amd64
set opts="root=UUID=1234 ro"
menuentry 'Debian GNU/Linux' --class debian --class gnu-linux $menuentry_id_option 'gnulinux-simple-1234' {
	load_video
	insmod ext2
	search --no-floppy --fs-uuid --set=root 1234
	echo	'Loading Linux ...'
	linux	/boot/vmlinuz-${kver} $opts quiet
	initrd	/boot/initrd.img-$kver
}
submenu 'Advanced options for Debian GNU/Linux' $menuentry_id_option 'gnulinux-advanced-1234' {
	menuentry 'Debian GNU/Linux, with Linux 6.1.0-13-amd64' --class debian $menuentry_id_option 'gnulinux-6.1.0-13-advanced' {
		linux	/boot/vmlinuz-6.1.0-13-amd64 root=UUID=1234 ro quiet
		initrd	/boot/initrd.img-6.1.0-13-amd64
	}
	menuentry "Debian GNU/Linux, with Linux 6.1.0-13-amd64 (recovery mode)" --class debian {
		linux	/boot/vmlinuz-6.1.0-13-amd64 root=UUID=1234 ro single
		initrd	/boot/initrd.img-6.1.0-13-amd64 /boot/extra.img
	}
}
menuentry 'Memtest' { linux16 (hd0,msdos1)/memtest.bin ; }
"#;

    #[test]
    fn lexes_quotes_vars_and_comments() {
        let c = lex("set a='x y' b=\"q $v z\" # c\nlinux /k\\ x;initrd ${i}");
        assert_eq!(c.len(), 3);
        assert_eq!(
            c[0][2],
            vec![
                Part::Lit("b=q ".into()),
                Part::Var("v".into()),
                Part::Lit(" z".into())
            ]
        );
        assert_eq!(c[1][1], vec![Part::Lit("/k x".into())]);
        assert_eq!(c[2][1], vec![Part::Var("i".into())]);
    }

    #[test]
    fn debian_style_menu() {
        let m = parse(DEBIANISH, HashMap::new());
        assert_eq!(m.entries.len(), 4, "{:#?}", m.entries);
        let e = &m.entries[0];
        assert_eq!(e.title, "Debian GNU/Linux");
        assert_eq!(e.id.as_deref(), Some("gnulinux-simple-1234"));
        assert_eq!(e.linux.as_deref(), Some("/boot/vmlinuz-6.1.0-13-amd64"));
        assert_eq!(e.args, "root=UUID=1234 ro quiet");
        assert_eq!(e.initrd, vec!["/boot/initrd.img-6.1.0-13-amd64"]);
        assert_eq!(m.entries[1].index_path, "1>0");
        assert_eq!(m.entries[2].index_path, "1>1");
        assert_eq!(m.entries[2].initrd.len(), 2);
        assert_eq!(m.entries[3].index_path, "2");
        assert_eq!(m.entries[3].linux.as_deref(), Some("/memtest.bin"));
        // default="2" after the else branch (both branches run; the last set wins).
        assert_eq!(m.default_index(), 3);
        assert_eq!(m.find("1"), Some(1));
        assert_eq!(m.find("1>1"), Some(2));
        assert_eq!(m.find("gnulinux-6.1.0-13-advanced"), Some(1));
        assert_eq!(
            m.find("Advanced options for Debian GNU/Linux>Debian GNU/Linux, with Linux 6.1.0-13-amd64 (recovery mode)"),
            Some(2)
        );
        assert_eq!(m.find("Memtest"), Some(3));
        assert_eq!(m.find("nope"), None);
    }

    #[test]
    fn saved_default_comes_from_grubenv() {
        let env = parse_grubenv(
            "# GRUB Environment Block\nsaved_entry=gnulinux-6.1.0-13-advanced\n####\n",
        );
        let m = parse(
            "set default=saved\nmenuentry a { linux /a }\nsubmenu s { menuentry b --id gnulinux-6.1.0-13-advanced { linux /b } }",
            env,
        );
        assert_eq!(m.default_index(), 1);
        let m = parse(
            "set default=\"b\"\nmenuentry a { linux /a }\nmenuentry b { linux /b }",
            HashMap::new(),
        );
        assert_eq!(m.default_index(), 1);
        let m = parse("set default=7\nmenuentry a { linux /a }", HashMap::new());
        assert_eq!(m.default_index(), 0, "out of range falls back to the first");
    }

    #[test]
    fn random_scripts_never_panic() {
        let toks = [
            "menuentry ",
            "submenu ",
            "function ",
            "{",
            "}",
            "\n",
            ";",
            " ",
            "'",
            "\"",
            "\\",
            "$",
            "${",
            "x",
            "=",
            "set ",
            "default=",
            "saved",
            "linux ",
            "initrd ",
            "/k",
            "(hd0)",
            "--id ",
            "--class",
            "1>0",
            ">",
            "if ",
            "then ",
            "else ",
            "fi",
            "#",
            "é",
        ];
        for seed in 0..3000 {
            let text = crate::random_config(seed, &toks, 60);
            let m = parse(&text, HashMap::new());
            let d = m.default_index();
            assert!(d == 0 || d < m.entries.len());
            let _ = m.find(&text.chars().take(5).collect::<String>());
        }
    }

    #[test]
    fn hostile_input_is_bounded() {
        let deep = "submenu x {\n".repeat(100) + &"}\n".repeat(100);
        let m = parse(&deep, HashMap::new());
        assert!(m.entries.is_empty());
        let many = "menuentry x { linux /k }\n".repeat(5000);
        assert_eq!(parse(&many, HashMap::new()).entries.len(), MAX_ENTRIES);
        let _ = parse("menuentry 'unterminated {\n\"$", HashMap::new());
        let _ = parse("${", HashMap::new());
    }
}

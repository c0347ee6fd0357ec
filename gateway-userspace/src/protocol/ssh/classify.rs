//! What an SSH `exec` command does, from its text: a shell-aware lexer and
//! the classes policy rules name (`ssh = ["read", ...]`).
//!
//! Sans-IO and pure, fuzzed (`fuzz/fuzz_targets/ssh_command.rs`). The lexer
//! follows POSIX `sh` quoting (single quotes, double quotes, backslash) and
//! splits a line at its control operators (`;`, `&`, `|`, `&&`, `||`,
//! newline, parentheses), so `ls; sudo rm -rf /` is two commands; a line's
//! class is its most dangerous command's. The word splitters on crates.io
//! (`shell-words`, `shlex`) return words only and lose the operators,
//! redirections and substitutions this needs, hence the hand-written lexer.
//!
//! Fails closed: a command that is unknown, that the lexer cannot finish
//! (an unterminated quote), that hides a command in an expansion (`$(...)`,
//! backticks, `$VAR` or a glob in command position, `eval`, a shell reading a
//! script), or that is over the limits, is [`Class::Dangerous`], the most
//! dangerous class: a rule that allows reads never lets it through. The
//! trade-off: the known-command tables are short, so ordinary but unlisted
//! tools need an explicit rule for `dangerous` (or an approval).

use std::fmt;

/// Longest command line classified; longer is [`Class::Dangerous`].
pub const MAX_COMMAND_BYTES: usize = 64 * 1024;
/// Most simple commands in one line; more is [`Class::Dangerous`].
pub const MAX_COMMANDS: usize = 256;
/// Deepest `sh -c '...'` / `sudo ...` nesting followed.
pub const MAX_DEPTH: usize = 4;
/// Most program names kept in a [`Classification`].
pub const MAX_PROGRAMS: usize = 16;

/// The classes, least to most dangerous (the order is the ranking).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Class {
    /// Looks, changes nothing (`ls`, `cat`, `systemctl status`).
    Read,
    /// Writes or moves files (`cp`, `tee`, `sed -i`, `> file`).
    Write,
    /// Deletes (`rm`, `find -delete`, `shred`).
    Delete,
    /// Starts, stops or signals services and processes (`systemctl restart`, `kill`).
    Service,
    /// Installs or removes software (`apt`, `pip`, `dpkg`).
    Package,
    /// Opens a database client (`psql`, `mysql`): commands the gate cannot see.
    Database,
    /// Changes user (`sudo`, `su`, `doas`, `pkexec`).
    Privileged,
    /// An interactive shell (the `shell` request, never an `exec` command).
    Shell,
    /// Unknown, unparsable or hidden: assumed to do anything.
    Dangerous,
}

impl Class {
    pub const ALL: [Class; 9] = [
        Class::Read,
        Class::Write,
        Class::Delete,
        Class::Service,
        Class::Package,
        Class::Database,
        Class::Privileged,
        Class::Shell,
        Class::Dangerous,
    ];

    /// The name policy files and audit records use.
    pub fn as_str(self) -> &'static str {
        match self {
            Class::Read => "read",
            Class::Write => "write",
            Class::Delete => "delete",
            Class::Service => "service",
            Class::Package => "package",
            Class::Database => "database",
            Class::Privileged => "privileged",
            Class::Shell => "shell",
            Class::Dangerous => "dangerous",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == s)
    }

    /// Whether running it may change the host.
    pub fn changes_state(self) -> bool {
        self != Class::Read
    }
}

impl fmt::Display for Class {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A command line's class and the programs it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Classification {
    pub class: Class,
    /// Program names in order (basename, at most [`MAX_PROGRAMS`]).
    pub programs: Vec<String>,
    /// Why it is [`Class::Dangerous`], when it is.
    pub why: Option<&'static str>,
}

/// One token of a command line.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Word(Word),
    /// `;`, `&`, `|`, `&&`, `||`, newline, `(`, `)`: ends a simple command.
    Separator,
    /// `>`, `>>`, `>|`, `&>` (output redirection; the next word is its target).
    RedirectOut,
    /// `<`, `<<`, `<<<`, `<&`, `>&` (the next word is its source/fd).
    RedirectOther,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Word {
    text: String,
    /// Contains `$(`, backticks, or `<(`/`>(`: runs a hidden command.
    substitution: bool,
    /// Contains an unquoted `$` expansion or glob.
    expansion: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LexError {
    Unterminated,
}

/// Splits a command line into words and operators, with `sh` quoting.
// One character loop: splitting it would spread the quoting state over functions.
#[allow(clippy::too_many_lines)]
fn lex(s: &str) -> Result<Vec<Token>, LexError> {
    let mut out = Vec::new();
    let mut cur: Option<Word> = None;
    let mut chars = s.chars().peekable();
    let flush = |cur: &mut Option<Word>, out: &mut Vec<Token>| {
        if let Some(w) = cur.take() {
            out.push(Token::Word(w));
        }
    };
    while let Some(c) = chars.next() {
        match c {
            ' ' | '\t' | '\r' => flush(&mut cur, &mut out),
            '\n' | ';' | '(' | ')' => {
                flush(&mut cur, &mut out);
                out.push(Token::Separator);
            }
            '&' => {
                flush(&mut cur, &mut out);
                if chars.peek() == Some(&'>') {
                    chars.next();
                    if chars.peek() == Some(&'>') {
                        chars.next();
                    }
                    out.push(Token::RedirectOut);
                } else {
                    if chars.peek() == Some(&'&') {
                        chars.next();
                    }
                    out.push(Token::Separator);
                }
            }
            '|' => {
                flush(&mut cur, &mut out);
                if matches!(chars.peek(), Some('|' | '&')) {
                    chars.next();
                }
                out.push(Token::Separator);
            }
            '>' | '<' => {
                // A digit-only word right before is the fd number (`2>`).
                if cur.as_ref().is_some_and(|w| {
                    !w.text.is_empty() && w.text.bytes().all(|b| b.is_ascii_digit())
                }) {
                    cur = None;
                }
                flush(&mut cur, &mut out);
                if chars.peek() == Some(&'(') {
                    // Process substitution: a hidden command.
                    cur = Some(Word {
                        substitution: true,
                        ..Word::default()
                    });
                    continue;
                }
                let mut kind = if c == '>' {
                    Token::RedirectOut
                } else {
                    Token::RedirectOther
                };
                while let Some(&n) = chars.peek() {
                    match n {
                        '>' | '<' | '|' => {
                            chars.next();
                        }
                        '&' => {
                            // `>&2`, `<&0`: duplicating a descriptor writes no file.
                            chars.next();
                            kind = Token::RedirectOther;
                        }
                        _ => break,
                    }
                }
                out.push(kind);
            }
            '\'' => {
                let w = cur.get_or_insert_with(Word::default);
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(ch) => w.text.push(ch),
                        None => return Err(LexError::Unterminated),
                    }
                }
            }
            '"' => {
                let w = cur.get_or_insert_with(Word::default);
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(ch @ ('"' | '\\' | '$' | '`')) => w.text.push(ch),
                            Some('\n') => {}
                            Some(ch) => {
                                w.text.push('\\');
                                w.text.push(ch);
                            }
                            None => return Err(LexError::Unterminated),
                        },
                        Some('`') => {
                            w.substitution = true;
                            w.text.push('`');
                        }
                        Some('$') => {
                            if chars.peek() == Some(&'(') {
                                w.substitution = true;
                            } else {
                                w.expansion = true;
                            }
                            w.text.push('$');
                        }
                        Some(ch) => w.text.push(ch),
                        None => return Err(LexError::Unterminated),
                    }
                }
            }
            '\\' => match chars.next() {
                Some('\n') => {}
                Some(ch) => cur.get_or_insert_with(Word::default).text.push(ch),
                None => return Err(LexError::Unterminated),
            },
            '`' => {
                let w = cur.get_or_insert_with(Word::default);
                w.substitution = true;
                w.text.push('`');
            }
            '$' => {
                let w = cur.get_or_insert_with(Word::default);
                if chars.peek() == Some(&'(') {
                    w.substitution = true;
                } else {
                    w.expansion = true;
                }
                w.text.push('$');
            }
            '*' | '?' | '[' | '{' | '~' => {
                let w = cur.get_or_insert_with(Word::default);
                w.expansion = true;
                w.text.push(c);
            }
            '#' if cur.is_none() => {
                // A comment runs to the end of the line.
                for ch in chars.by_ref() {
                    if ch == '\n' {
                        out.push(Token::Separator);
                        break;
                    }
                }
            }
            _ => cur.get_or_insert_with(Word::default).text.push(c),
        }
    }
    flush(&mut cur, &mut out);
    Ok(out)
}

/// Classifies an `exec` command line.
pub fn classify(command: &str) -> Classification {
    let mut acc = Acc::default();
    if command.len() > MAX_COMMAND_BYTES {
        acc.dangerous("the command is longer than the classifier's limit");
    } else {
        line(command, 0, &mut acc);
    }
    if acc.class.is_none() {
        // An empty command: sshd runs the user's shell with no input.
        acc.dangerous("an empty command");
    }
    Classification {
        class: acc.class.unwrap_or(Class::Dangerous),
        programs: acc.programs,
        why: acc.why,
    }
}

#[derive(Default)]
struct Acc {
    class: Option<Class>,
    programs: Vec<String>,
    why: Option<&'static str>,
    commands: usize,
}

impl Acc {
    fn raise(&mut self, c: Class) {
        self.class = Some(self.class.map_or(c, |old| old.max(c)));
    }
    fn dangerous(&mut self, why: &'static str) {
        self.raise(Class::Dangerous);
        self.why.get_or_insert(why);
    }
    fn program(&mut self, name: &str) {
        if self.programs.len() < MAX_PROGRAMS {
            self.programs.push(name.to_owned());
        }
    }
}

fn line(s: &str, depth: usize, acc: &mut Acc) {
    if depth > MAX_DEPTH {
        acc.dangerous("nested deeper than the classifier follows");
        return;
    }
    let tokens = match lex(s) {
        Ok(t) => t,
        Err(LexError::Unterminated) => {
            acc.dangerous("an unterminated quote or escape");
            return;
        }
    };
    let mut words: Vec<&Word> = Vec::new();
    let mut redirect: Option<&Token> = None;
    let mut any = false;
    for t in tokens.iter().chain(std::iter::once(&Token::Separator)) {
        match t {
            Token::Word(w) => {
                if let Some(r) = redirect.take() {
                    if w.substitution {
                        acc.dangerous("a command substitution");
                    }
                    if *r == Token::RedirectOut && !is_sink(&w.text) {
                        acc.raise(Class::Write);
                    }
                } else {
                    words.push(w);
                }
            }
            Token::RedirectOut | Token::RedirectOther => {
                if redirect.is_some() {
                    acc.dangerous("a redirection without a target");
                }
                redirect = Some(t);
            }
            Token::Separator => {
                if redirect.take().is_some() {
                    acc.dangerous("a redirection without a target");
                }
                if !words.is_empty() {
                    acc.commands += 1;
                    if acc.commands > MAX_COMMANDS {
                        acc.dangerous("more commands than the classifier's limit");
                        return;
                    }
                    any = true;
                    simple(&words, depth, acc);
                    words.clear();
                }
            }
        }
    }
    if !any && depth > 0 {
        acc.dangerous("an empty nested command");
    }
}

fn is_sink(target: &str) -> bool {
    matches!(target, "/dev/null" | "/dev/stdout" | "/dev/stderr")
}

/// Commands that only read.
const READ: &[&str] = &[
    "ls",
    "cat",
    "head",
    "tail",
    "less",
    "more",
    "grep",
    "egrep",
    "fgrep",
    "zgrep",
    "wc",
    "sort",
    "uniq",
    "cut",
    "tr",
    "awk",
    "echo",
    "printf",
    "pwd",
    "whoami",
    "id",
    "groups",
    "hostname",
    "uname",
    "uptime",
    "date",
    "df",
    "du",
    "free",
    "ps",
    "pgrep",
    "top",
    "w",
    "who",
    "last",
    "stat",
    "file",
    "md5sum",
    "sha1sum",
    "sha256sum",
    "sha512sum",
    "b2sum",
    "cksum",
    "diff",
    "cmp",
    "test",
    "[",
    "true",
    "false",
    "which",
    "type",
    "whereis",
    "realpath",
    "readlink",
    "basename",
    "dirname",
    "printenv",
    "lsblk",
    "lscpu",
    "lsof",
    "ss",
    "netstat",
    "ip",
    "journalctl",
    "dmesg",
    "getent",
    "nproc",
    "seq",
    "sleep",
    "column",
    "jq",
    "yes",
    "tac",
    "nl",
    "od",
    "hexdump",
    "xxd",
    "strings",
    "zcat",
    "lsmod",
    "locale",
    "tty",
    "stty",
    "base64",
    "env",
    "getconf",
    "arch",
];

/// Commands that write or move files (their arguments name what).
const WRITE: &[&str] = &[
    "cp", "mv", "touch", "mkdir", "tee", "chmod", "chown", "chgrp", "ln", "dd", "truncate",
    "install", "rsync", "tar", "gzip", "gunzip", "zip", "unzip", "patch", "crontab", "mkfifo",
    "mktemp", "setfacl", "git",
];

const DELETE: &[&str] = &["rm", "rmdir", "shred", "unlink", "wipefs"];

const SERVICE: &[&str] = &[
    "systemctl",
    "service",
    "kill",
    "pkill",
    "killall",
    "reboot",
    "shutdown",
    "halt",
    "poweroff",
    "init",
    "telinit",
    "launchctl",
    "supervisorctl",
    "docker",
    "podman",
    "kubectl",
    "crictl",
];

const PACKAGE: &[&str] = &[
    "apt", "apt-get", "aptitude", "dpkg", "yum", "dnf", "rpm", "zypper", "apk", "pacman", "snap",
    "flatpak", "pip", "pip3", "pipx", "npm", "yarn", "pnpm", "gem", "cargo", "go", "brew",
];

const DATABASE: &[&str] = &[
    "psql",
    "mysql",
    "mariadb",
    "sqlite3",
    "redis-cli",
    "mongo",
    "mongosh",
    "sqlplus",
    "cqlsh",
    "clickhouse-client",
    "pg_dump",
    "pg_dumpall",
    "pg_restore",
    "mysqldump",
    "sqlcmd",
    "isql",
];

const PRIVILEGED: &[&str] = &[
    "sudo", "su", "doas", "pkexec", "runuser", "sg", "newgrp", "setpriv",
];

/// Shells: `sh -c '...'` is classified by its string; anything else reads a
/// script the gate cannot see.
const SHELLS: &[&str] = &["sh", "bash", "dash", "zsh", "ksh", "ash", "busybox"];

/// Run the rest of the line as a command (their own options skipped).
const WRAPPERS: &[&str] = &[
    "nice", "nohup", "time", "timeout", "stdbuf", "ionice", "xargs", "command", "exec", "builtin",
    "chrt", "taskset", "setsid", "unbuffer",
];

/// `systemctl` verbs that only look.
const SYSTEMCTL_READ: &[&str] = &[
    "status",
    "show",
    "cat",
    "list-units",
    "list-unit-files",
    "list-timers",
    "list-sockets",
    "list-dependencies",
    "is-active",
    "is-enabled",
    "is-failed",
    "is-system-running",
    "get-default",
    "help",
];

const GIT_READ: &[&str] = &[
    "status",
    "log",
    "diff",
    "show",
    "branch",
    "remote",
    "rev-parse",
    "ls-files",
    "blame",
    "describe",
    "tag",
    "config",
];

// The program tables in one place, read top to bottom.
#[allow(clippy::too_many_lines)]
fn simple(words: &[&Word], depth: usize, acc: &mut Acc) {
    // Leading `NAME=value` assignments set the environment of the command.
    let mut i = 0;
    while i < words.len() && is_assignment(&words[i].text) {
        if words[i].substitution {
            acc.dangerous("a command substitution");
        }
        i += 1;
    }
    let rest = &words[i..];
    let Some(first) = rest.first() else {
        // Only assignments: sets shell variables, runs nothing.
        acc.raise(Class::Read);
        return;
    };
    if rest.iter().any(|w| w.substitution) {
        acc.dangerous("a command substitution");
    }
    if first.expansion || first.text.is_empty() {
        acc.dangerous("the program name is an expansion");
        return;
    }
    let name = first.text.rsplit('/').next().unwrap_or_default();
    acc.program(name);
    let args: Vec<&str> = rest[1..].iter().map(|w| w.text.as_str()).collect();
    if PRIVILEGED.contains(&name) {
        acc.raise(Class::Privileged);
        privileged(name, &rest[1..], depth, acc);
        return;
    }
    if name == "env" {
        // `env` alone prints the environment; `env [-i] [NAME=v]... cmd` runs cmd.
        let mut j = 1;
        while j < rest.len() && (rest[j].text.starts_with('-') || is_assignment(&rest[j].text)) {
            j += 1;
        }
        if j < rest.len() {
            simple(&rest[j..], depth, acc);
        } else {
            acc.raise(Class::Read);
        }
        return;
    }
    if WRAPPERS.contains(&name) {
        wrapped(name, &rest[1..], depth, acc);
        return;
    }
    if SHELLS.contains(&name) {
        shell(&args, depth, acc);
        return;
    }
    if name == "scp" {
        // The server side of legacy `scp -O`: `-f` sends files (a read),
        // `-t` receives them (a write). A client `scp` reaches other hosts.
        if args
            .iter()
            .any(|a| a.starts_with('-') && !a.starts_with("--") && a.contains('t'))
        {
            acc.raise(Class::Write);
        } else if args
            .iter()
            .any(|a| a.starts_with('-') && !a.starts_with("--") && a.contains('f'))
        {
            acc.raise(Class::Read);
        } else {
            acc.dangerous("a client scp reaches hosts the gate cannot see");
        }
        return;
    }
    if matches!(
        name,
        "eval" | "source" | "." | "ssh" | "sftp" | "script" | "expect"
    ) {
        acc.dangerous("runs commands the classifier cannot see");
        return;
    }
    let class = match name {
        "systemctl" => {
            let verb = args.iter().find(|a| !a.starts_with('-'));
            if verb.is_none_or(|v| SYSTEMCTL_READ.contains(v)) {
                Class::Read
            } else {
                Class::Service
            }
        }
        "service" => {
            if args.get(1).is_some_and(|v| *v == "status") || args.first() == Some(&"--status-all")
            {
                Class::Read
            } else {
                Class::Service
            }
        }
        "git" => {
            let verb = args.iter().find(|a| !a.starts_with('-'));
            if verb.is_some_and(|v| GIT_READ.contains(v)) {
                Class::Read
            } else {
                Class::Write
            }
        }
        "sed" | "perl" | "ruby" | "python" | "python3" | "node" => {
            if name == "sed"
                && !args
                    .iter()
                    .any(|a| a.starts_with("-i") || *a == "--in-place")
            {
                Class::Read
            } else if name == "sed" {
                Class::Write
            } else {
                acc.dangerous("an interpreter runs code the classifier cannot see");
                return;
            }
        }
        "find" => {
            if args
                .iter()
                .any(|a| matches!(*a, "-exec" | "-execdir" | "-ok" | "-okdir"))
            {
                acc.dangerous("find runs commands the classifier cannot see");
                return;
            } else if args.contains(&"-delete") {
                Class::Delete
            } else if args
                .iter()
                .any(|a| a.starts_with("-fprint") || *a == "-fls")
            {
                Class::Write
            } else {
                Class::Read
            }
        }
        "sort"
            if args
                .iter()
                .any(|a| a.starts_with("-o") || a.starts_with("--output")) =>
        {
            Class::Write
        }
        n if READ.contains(&n) => Class::Read,
        n if WRITE.contains(&n) => Class::Write,
        n if DELETE.contains(&n) => Class::Delete,
        n if SERVICE.contains(&n) => Class::Service,
        n if PACKAGE.contains(&n) => Class::Package,
        n if DATABASE.contains(&n) => Class::Database,
        _ => {
            acc.dangerous("an unknown program");
            return;
        }
    };
    acc.raise(class);
}

fn is_assignment(w: &str) -> bool {
    match w.split_once('=') {
        Some((name, _)) => {
            !name.is_empty()
                && !name.starts_with(|c: char| c.is_ascii_digit())
                && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        }
        None => false,
    }
}

/// `sudo [options] cmd ...`: the command runs as another user; its own class counts too.
fn privileged(name: &str, rest: &[&Word], depth: usize, acc: &mut Acc) {
    // Options taking a value, per program.
    let with_value: &[&str] = match name {
        "sudo" => &[
            "-u", "-g", "-C", "-D", "-h", "-p", "-r", "-t", "-U", "-T", "-R",
        ],
        "su" => &["-c", "-s", "-g", "-G", "-w"],
        "doas" => &["-u", "-C"],
        "runuser" => &["-u", "-g", "-G", "-c", "-s", "-w"],
        "setpriv" => &["--reuid", "--regid", "--groups"],
        _ => &[],
    };
    if name == "su" || name == "runuser" {
        // `su [user] -c 'cmd'`: the string is the command; without it, a root shell.
        if let Some(i) = rest
            .iter()
            .position(|w| w.text == "-c" || w.text == "--command")
        {
            match rest.get(i + 1) {
                Some(cmd) => line(&cmd.text, depth + 1, acc),
                None => acc.dangerous("su -c without a command"),
            }
        } else if name == "su" || !rest.iter().any(|w| !w.text.starts_with('-')) {
            acc.raise(Class::Shell);
        }
        if name == "su" {
            return;
        }
    }
    let mut j = 0;
    while j < rest.len() {
        let t = rest[j].text.as_str();
        if t == "--" {
            j += 1;
            break;
        }
        if !t.starts_with('-') {
            break;
        }
        if matches!(t, "-s" | "-i" | "--shell" | "--login") && name == "sudo" {
            // `sudo -s` / `sudo -i` alone: a root shell.
            if rest.len() == j + 1 {
                acc.raise(Class::Shell);
                return;
            }
        }
        if with_value.contains(&t) {
            j += 1;
        }
        j += 1;
    }
    if j < rest.len() {
        simple(&rest[j..], depth + 1, acc);
    } else if name != "su" {
        // `sudo -l`, `sudo -v`: nothing runs as root but sudo itself.
        acc.raise(Class::Privileged);
    }
}

/// `timeout 5 cmd`, `nice -n 5 cmd`, `xargs rm`: the wrapped command counts.
fn wrapped(name: &str, rest: &[&Word], depth: usize, acc: &mut Acc) {
    let mut j = 0;
    while j < rest.len() && rest[j].text.starts_with('-') {
        let t = rest[j].text.as_str();
        if matches!(
            (name, t),
            ("nice" | "ionice", "-n")
                | ("stdbuf" | "ionice", "-c")
                | ("timeout", "-s" | "-k")
                | ("xargs", "-n" | "-I" | "-d" | "-P" | "-L" | "-s" | "-E")
        ) {
            j += 1;
        }
        j += 1;
    }
    // `timeout DURATION cmd`, `chrt PRIO cmd`, `taskset MASK cmd`.
    if matches!(name, "timeout" | "chrt" | "taskset") && j < rest.len() {
        j += 1;
    }
    if j < rest.len() {
        simple(&rest[j..], depth + 1, acc);
    } else if name == "xargs" {
        // `xargs` alone runs `echo`.
        acc.raise(Class::Read);
    } else {
        acc.dangerous("a wrapper without a command");
    }
}

/// `sh -c 'string'`: the string is classified; any other use reads a script
/// (stdin or a file) the classifier never sees.
fn shell(args: &[&str], depth: usize, acc: &mut Acc) {
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if *a == "-c" || (a.starts_with('-') && !a.starts_with("--") && a.contains('c')) {
            match it.next() {
                Some(cmd) => line(cmd, depth + 1, acc),
                None => acc.dangerous("sh -c without a command"),
            }
            return;
        }
        if !a.starts_with('-') {
            break;
        }
    }
    acc.dangerous("a shell reading a script the classifier cannot see");
}

/// The command as an approver and the record see it: words kept, the value
/// of anything that looks like a secret replaced by `?` (`PGPASSWORD=?`,
/// `-p?`, `--password=?`, the word after `--password`), cut to `max` chars.
pub fn redact(command: &str, max: usize) -> String {
    let mut out = String::with_capacity(command.len().min(max));
    let mut hide_next = false;
    // `mysql -pSECRET`: the password glued to `-p` (other tools' `-p` is not a secret).
    let glued_p = command.split(' ').any(|w| {
        matches!(
            w.rsplit('/').next(),
            Some("mysql" | "mariadb" | "mysqldump" | "mysqladmin")
        )
    });
    for (i, word) in command.split(' ').enumerate() {
        if i > 0 {
            out.push(' ');
        }
        let lower = word.to_ascii_lowercase();
        let secretish = |k: &str| {
            [
                "pass",
                "secret",
                "token",
                "key",
                "pwd",
                "auth",
                "credential",
            ]
            .iter()
            .any(|s| k.contains(s))
        };
        if hide_next {
            out.push('?');
            hide_next = false;
        } else if let Some((k, _)) = word.split_once('=')
            && secretish(&k.to_ascii_lowercase())
        {
            out.push_str(k);
            out.push_str("=?");
        } else if glued_p && lower.starts_with("-p") && word.len() > 2 && !lower.starts_with("--") {
            out.push_str("-p?");
        } else {
            if lower.starts_with("--") && secretish(&lower) {
                hide_next = true;
            }
            out.push_str(word);
        }
        if out.len() > max {
            break;
        }
    }
    crate::gate::truncate_chars(&out, max)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(s: &str) -> Class {
        classify(s).class
    }

    #[test]
    fn reads_are_reads() {
        for s in [
            "ls -la /etc",
            "cat /etc/hostname | grep x | wc -l",
            "systemctl status payments",
            "uname -a; uptime",
            "echo hi > /dev/null",
            "journalctl -u x 2>&1 | tail -n 5",
            "git log --oneline",
            "FOO=1 env",
            "timeout 5 cat x",
            "sed -n 1,3p file",
        ] {
            assert_eq!(class(s), Class::Read, "{s}");
        }
    }

    #[test]
    fn each_class_from_its_programs() {
        let cases = [
            ("echo x > /tmp/f", Class::Write),
            ("cp a b && ls", Class::Write),
            ("sed -i s/a/b/ f", Class::Write),
            ("rm -rf /tmp/x", Class::Delete),
            ("find / -name x -delete", Class::Delete),
            ("systemctl restart payments", Class::Service),
            ("kill -9 1", Class::Service),
            ("apt-get install -y curl", Class::Package),
            ("pip install requests", Class::Package),
            ("psql -c 'select 1'", Class::Database),
            ("sudo systemctl restart payments", Class::Privileged),
            ("ls; sudo -u postgres psql", Class::Privileged),
            ("doas ls", Class::Privileged),
            ("pkexec ls", Class::Privileged),
            ("su -c 'rm -rf /'", Class::Privileged),
            ("su", Class::Shell),
            ("sudo -i", Class::Shell),
            ("frobnicate --now", Class::Dangerous),
            ("ls $(echo rm)", Class::Dangerous),
            ("ls `id`", Class::Dangerous),
            ("$CMD x", Class::Dangerous),
            ("echo 'unterminated", Class::Dangerous),
            ("bash script.sh", Class::Dangerous),
            ("sh -c 'ls; rm x'", Class::Delete),
            ("bash -lc 'sudo reboot'", Class::Privileged),
            ("eval ls", Class::Dangerous),
            ("find . -exec rm {} +", Class::Dangerous),
            ("python3 -c 'import os'", Class::Dangerous),
            ("cat <(rm x)", Class::Dangerous),
            ("", Class::Dangerous),
            ("nohup sudo reboot &", Class::Privileged),
            ("xargs rm < list", Class::Delete),
            ("scp -f /etc/hostname", Class::Read),
            ("scp -t /tmp/x", Class::Write),
            ("scp a b:c", Class::Dangerous),
        ];
        for (s, want) in cases {
            assert_eq!(class(s), want, "{s}");
        }
    }

    #[test]
    fn quotes_keep_operators_inside_words() {
        let c = classify("echo 'a; rm -rf /' \"b && sudo x\"");
        assert_eq!(c.class, Class::Read);
        assert_eq!(c.programs, ["echo"]);
        let c = classify("ls;rm x|sudo -u a cat");
        assert_eq!(c.programs, ["ls", "rm", "sudo", "cat"]);
        assert_eq!(c.class, Class::Privileged);
    }

    #[test]
    fn limits_make_it_dangerous() {
        assert_eq!(class(&"ls;".repeat(MAX_COMMANDS + 1)), Class::Dangerous);
        assert_eq!(class(&"a".repeat(MAX_COMMAND_BYTES + 1)), Class::Dangerous);
        let deep = (0..10).fold("ls".to_owned(), |acc, _| {
            format!("sh -c {}", shell_quote(&acc))
        });
        assert_eq!(class(&deep), Class::Dangerous);
    }

    fn shell_quote(s: &str) -> String {
        format!("'{}'", s.replace('\'', "'\\''"))
    }

    #[test]
    fn redaction_hides_secret_looking_values() {
        assert_eq!(
            redact(
                "PGPASSWORD=hunter2 mysql -psecret --password abc --token=x ls",
                200
            ),
            "PGPASSWORD=? mysql -p? --password ? --token=? ls"
        );
        assert_eq!(
            redact("sudo systemctl restart payments", 200),
            "sudo systemctl restart payments"
        );
    }
}

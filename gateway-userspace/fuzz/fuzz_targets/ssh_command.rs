//! Any bytes as an SSH `exec` command line through the classifier and the
//! redactor: no panic, a class always comes back, and a line that hides a
//! command (`$(`, a backtick, not quoted away) is never classified as a read. The same bytes
//! as an SFTP stream, both ways: framed and decoded without a panic, never
//! a packet over the limit, and a decoded open's path never longer than
//! the limit.
#![no_main]

use agentgate::protocol::ssh::classify::{Class, classify, redact};
use agentgate::protocol::ssh::sftp::{self, Framer, Op};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let c = classify(&text);
    // Without single quotes, backslashes and comments, a `$(` or a backtick
    // is a substitution the shell runs (unquoted, in double quotes, or in
    // an `sh -c` string): never a read. (`echo '$(id)'` is one.)
    if (text.contains("$(") || text.contains('`')) && !text.contains(['\'', '\\', '#']) {
        assert_ne!(c.class, Class::Read, "{text:?}");
    }
    assert!(c.programs.len() <= agentgate::protocol::ssh::classify::MAX_PROGRAMS);
    let _ = redact(&text, 200);

    let mut f = Framer::default();
    for part in data.chunks(7) {
        f.push(part);
        while let Ok(Some(p)) = f.next_packet() {
            assert!(p.len() <= sftp::MAX_PACKET + 4);
            if let Ok(r) = sftp::parse_request(&p)
                && let Op::Open { path, .. } = &r.op
            {
                assert!(path.len() <= 3 * sftp::MAX_PATH);
                let _ = sftp::normalize(path);
            }
            let _ = sftp::parse_reply(&p);
        }
    }
});

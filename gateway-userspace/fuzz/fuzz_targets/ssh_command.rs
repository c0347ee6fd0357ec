//! Any bytes as an SSH `exec` command line through the classifier and the
//! redactor: no panic, a class always comes back, and a line that hides a
//! command (`$(`, a backtick) is never classified as a read.
#![no_main]

use agentgate::protocol::ssh::classify::{Class, classify, redact};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let c = classify(&text);
    if text.contains("$(") || text.contains('`') {
        assert_ne!(c.class, Class::Read, "{text:?}");
    }
    assert!(c.programs.len() <= agentgate::protocol::ssh::classify::MAX_PROGRAMS);
    let _ = redact(&text, 200);
});

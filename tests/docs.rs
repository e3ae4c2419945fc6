//! docs/PROTOCOL.md states the sizes the code uses.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on failure

use tcpx::wire;

fn protocol_md() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/PROTOCOL.md")).unwrap()
}

/// N where the page defines `**Name** (N bytes`.
fn stated_size(doc: &str, name: &str) -> usize {
    let tag = format!("**{name}**");
    doc.match_indices(&tag)
        .find_map(|(at, _)| {
            let rest = doc[at + tag.len()..].trim_start().strip_prefix('(')?;
            let num: String = rest.chars().take_while(char::is_ascii_digit).collect();
            rest[num.len()..]
                .starts_with(" bytes")
                .then(|| num.parse().ok())?
        })
        .unwrap_or_else(|| panic!("PROTOCOL.md does not define {tag} (N bytes)"))
}

#[test]
fn every_header_size_in_protocol_md_is_the_code_s() {
    let doc = protocol_md();
    for (name, len) in [
        ("Hello", wire::HELLO_LEN),
        ("Welcome", wire::WELCOME_LEN),
        ("Msg", wire::MSG_LEN),
        ("Chunk", wire::CHUNK_LEN),
        ("Post", wire::POST_LEN),
        ("Ack", wire::ACK_LEN),
        ("Ping", wire::PING_LEN),
        ("Reject", wire::REJECT_LEN),
        ("Bye", wire::BYE_LEN),
        ("Retire", wire::RETIRE_LEN),
        ("Placed", wire::PLACED_LEN),
        ("Dial", wire::DIAL_LEN),
    ] {
        assert_eq!(stated_size(&doc, name), len, "{name}");
    }
    assert!(doc.contains(&format!("(every header, {} bytes)", wire::PREFIX_LEN)));
    assert!(doc.contains(&format!(
        "# tcpx-rs peer wire protocol (version {})",
        wire::VERSION
    )));
    assert!(doc.contains(&format!("+ {} per buffer", wire::POST_BUF_LEN)));
    assert!(doc.contains(&format!("+ {} per NIC", wire::ADDR_LEN)));
    assert!(doc.contains(&format!(
        "**Dial** ({} bytes + {})",
        wire::DIAL_LEN,
        wire::ADDR_LEN
    )));
    assert!(doc.contains(&format!(
        "payload = bitmap bytes, 1..{}",
        wire::MAX_PLACED_BYTES
    )));
}

/// docs/DEVMEM.md lists exactly the devmem counters of `Net::stats()`.
#[test]
fn devmem_md_names_every_devmem_counter() {
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/DEVMEM.md")).unwrap();
    let at = doc
        .find("`Net::stats()`:")
        .expect("DEVMEM.md lists the counters");
    let para = &doc[at..doc[at..].find("\n\n").map_or(doc.len(), |e| at + e)];
    let mut listed: Vec<&str> = para
        .split('`')
        .skip(1)
        .step_by(2)
        .filter(|w| w.starts_with("devmem_"))
        .collect();
    let fields = format!("{:?}", tcpx::Stats::default());
    let mut counters: Vec<&str> = fields
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("devmem_"))
        .collect();
    listed.sort_unstable();
    counters.sort_unstable();
    assert_eq!(listed, counters);
}

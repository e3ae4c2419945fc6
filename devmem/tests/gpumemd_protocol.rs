//! Golden bytes and round trips for the gpumemd wire format. Each golden
//! frame is derived by hand from the field numbers and wire types of
//! `unix_socket_proto.proto`: a key byte is `(field << 3) | wire_type`
//! (0 = varint, 2 = length-delimited), and every frame starts with the
//! payload length as a big-endian u16.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on failure

use devmem::gpumemd::frame::{parse_header, HEADER_LEN};
use devmem::gpumemd::proto::*;
use devmem::gpumemd::{encode_frame, parse_frame, FlowRule, FrameError, PoolMetadata};
use proptest::prelude::*;

fn hex(s: &str) -> Vec<u8> {
    s.split_whitespace()
        .map(|b| u8::from_str_radix(b, 16).expect("test hex"))
        .collect()
}

const PCI: &str = "0000:04:00.0";

/// Checks both directions: our encoding is the golden bytes, and the golden
/// bytes parse back to the same message using all of them.
fn golden(msg: UnixSocketProto, bytes: &str) {
    let want = hex(bytes);
    assert_eq!(encode_frame(&msg).unwrap(), want, "encoding of {msg:?}");
    let (back, used) = parse_frame(&want).unwrap();
    assert_eq!(back, msg);
    assert_eq!(used, want.len());
}

#[test]
fn raw_bytes_pci_request_is_golden() {
    // 0a = field 1 (raw_bytes), LEN; 0c = 12 bytes "0000:04:00.0".
    // Payload = 14 bytes -> header 00 0e.
    golden(
        UnixSocketProto::raw(PCI),
        "00 0e 0a 0c 30 30 30 30 3a 30 34 3a 30 30 2e 30",
    );
}

#[test]
fn ok_reply_is_golden() {
    // 0a 03 "Ok." -> 5 bytes.
    golden(UnixSocketProto::raw("Ok."), "00 05 0a 03 4f 6b 2e");
}

#[test]
fn queue_id_query_is_golden() {
    // Inner QueueIdQuery: 0a 0c <pci> (14 bytes); outer 1a = field 3, LEN 0e.
    golden(
        UnixSocketProto::with(Payload::QueueIdQuery(QueueIdQuery {
            gpu_pci_addr: PCI.into(),
        })),
        "00 10 1a 0e 0a 0c 30 30 30 30 3a 30 34 3a 30 30 2e 30",
    );
}

#[test]
fn queue_id_response_is_golden_and_unpacked() {
    // proto2 repeated int32 is unpacked: 08 03 08 04 (field 1 varint, twice);
    // outer 22 = field 4, LEN 04.
    golden(
        UnixSocketProto::with(Payload::QueueIdResponse(QueueIdResponse {
            queue_ids: vec![3, 4],
        })),
        "00 06 22 04 08 03 08 04",
    );
}

#[test]
fn packed_queue_ids_are_accepted_too() {
    // A packed encoding (0a 02 03 04) must decode to the same ids.
    let (m, _) = parse_frame(&hex("00 06 22 04 0a 02 03 04")).unwrap();
    assert_eq!(
        m.payload,
        Some(Payload::QueueIdResponse(QueueIdResponse {
            queue_ids: vec![3, 4]
        }))
    );
}

#[test]
fn application_register_requests_are_golden() {
    // Inner: 08 01 (field 1 bool true); outer 32 = field 6, LEN 02.
    let reg = |b| {
        UnixSocketProto::with(Payload::ApplicationRegisterRequest(
            ApplicationRegisterRequest {
                register_client: Some(b),
            },
        ))
    };
    golden(reg(true), "00 04 32 02 08 01");
    // proto2 optional keeps presence: false is still sent as 08 00.
    golden(reg(false), "00 04 32 02 08 00");
}

#[test]
fn ipv4_flow_steer_rule_request_is_golden() {
    // SocketAddress src: 0a 08 "10.0.0.2", 10 c0 b8 02 (port 40000 varint) = 14 bytes.
    // SocketAddress dst: 0a 08 "10.0.0.1", 10 d0 86 03 (port 50000) = 14 bytes.
    // Ntuple: 08 01 (TCP_V4_FLOW), 12 0e <src>, 1a 0e <dst> = 34 (0x22) bytes.
    // Request: 0a 22 <ntuple>, 1a 0c <pci> = 50 (0x32); outer 12 = field 2.
    let rule = FlowRule::for_accepted(
        "10.0.0.1:50000".parse().unwrap(),
        "10.0.0.2:40000".parse().unwrap(),
    )
    .with_gpu(PCI);
    let msg = UnixSocketProto::with(Payload::FlowSteerRuleRequest(rule.to_proto().unwrap()));
    golden(
        msg,
        "00 34 12 32 0a 22 08 01 12 0e 0a 08 31 30 2e 30 2e 30 2e 32 10 c0 b8 02
         1a 0e 0a 08 31 30 2e 30 2e 30 2e 31 10 d0 86 03
         1a 0c 30 30 30 30 3a 30 34 3a 30 30 2e 30",
    );
    // With queue_id 5: 10 05 between the ntuple (field 1) and pci (field 3).
    let msg = UnixSocketProto::with(Payload::FlowSteerRuleRequest(
        rule.clone().with_queue(5).to_proto().unwrap(),
    ));
    golden(
        msg,
        "00 36 12 34 0a 22 08 01 12 0e 0a 08 31 30 2e 30 2e 30 2e 32 10 c0 b8 02
         1a 0e 0a 08 31 30 2e 30 2e 30 2e 31 10 d0 86 03 10 05
         1a 0c 30 30 30 30 3a 30 34 3a 30 30 2e 30",
    );
}

#[test]
fn ipv6_flow_steer_rule_request_is_golden() {
    // flow_type 08 05 (TCP_V6_FLOW); addresses in presentation form "fd00::2".
    // No GPU and no queue: the original omits both fields.
    let rule = FlowRule::for_accepted(
        "[fd00::1]:50000".parse().unwrap(),
        "[fd00::2]:40000".parse().unwrap(),
    );
    golden(
        UnixSocketProto::with(Payload::FlowSteerRuleRequest(rule.to_proto().unwrap())),
        "00 24 12 22 0a 20 08 05 12 0d 0a 07 66 64 30 30 3a 3a 32 10 c0 b8 02
         1a 0d 0a 07 66 64 30 30 3a 3a 31 10 d0 86 03",
    );
}

#[test]
fn daemon_error_reply_with_status_field_5_decodes() {
    // get_gpu_metadata's "not found": raw_bytes "Not found." (0a 0a ...) plus
    // google.rpc.Status as field 5 (2a 25): code 08 03, message 12 21 <33 bytes>.
    let bytes = hex("00 33 0a 0a 4e 6f 74 20 66 6f 75 6e 64 2e 2a 25 08 03 12 21
         52 65 71 75 65 73 74 65 64 20 47 50 55 20 50 43 49 20 41 64 64 72
         20 6e 6f 74 20 66 6f 75 6e 64 2e");
    let (m, used) = parse_frame(&bytes).unwrap();
    assert_eq!(used, bytes.len());
    assert_eq!(m.raw_bytes(), Some(&b"Not found."[..]));
    let st = m.status.expect("status");
    assert_eq!(st.code, 3);
    assert_eq!(st.message, "Requested GPU PCI Addr not found.");
}

#[test]
fn pool_metadata_struct_is_golden() {
    // {int fd = 7; <4 pad>; size_t size = 64 MiB; size_t align = 2 MiB}, LE.
    let md = PoolMetadata {
        daemon_fd: 7,
        size: 64 << 20,
        align: 2 << 20,
    };
    let want = hex("07 00 00 00 00 00 00 00  00 00 00 04 00 00 00 00  00 00 20 00 00 00 00 00");
    assert_eq!(md.to_bytes().to_vec(), want);
    // Padding from the daemon's memory is arbitrary and must be ignored.
    let mut dirty = want.clone();
    dirty[4..8].copy_from_slice(&[0xde, 0xad, 0xbe, 0xef]);
    assert_eq!(PoolMetadata::from_bytes(&dirty).unwrap(), md);
}

#[test]
fn unknown_field_decodes_to_an_empty_oneof() {
    // Field 7 varint (38 01) is unknown: skipped, no payload case set.
    let (m, _) = parse_frame(&hex("00 02 38 01")).unwrap();
    assert_eq!(m.payload, None);
}

#[test]
fn truncated_payload_is_too_short() {
    assert_eq!(
        parse_frame(&hex("00 05 0a 03 4f")).unwrap_err(),
        FrameError::TooShort { need: 7, have: 5 }
    );
}

#[test]
fn garbage_payload_is_a_decode_error() {
    assert!(matches!(
        parse_frame(&hex("00 03 ff ff ff")),
        Err(FrameError::Decode(_))
    ));
}

#[test]
fn parse_frame_reports_bytes_used_when_frames_follow() {
    let mut two = hex("00 05 0a 03 4f 6b 2e");
    two.extend(hex("00 04 32 02 08 01"));
    let (m, used) = parse_frame(&two).unwrap();
    assert_eq!(m.raw_bytes(), Some(&b"Ok."[..]));
    assert_eq!(used, 7);
    let (m2, used2) = parse_frame(&two[used..]).unwrap();
    assert_eq!(m2.kind(), "application_register_request");
    assert_eq!(used2, 6);
}

#[test]
fn mixed_family_rule_is_rejected() {
    let r = FlowRule::for_accepted(
        "10.0.0.1:1".parse().unwrap(),
        "[fd00::2]:2".parse().unwrap(),
    );
    assert!(r.to_proto().is_err());
}

fn arb_addr() -> impl Strategy<Value = SocketAddress> {
    (
        proptest::option::of("[0-9a-f:.]{0,40}"),
        proptest::option::of(any::<i32>()),
    )
        .prop_map(|(ip_address, port)| SocketAddress { ip_address, port })
}

fn arb_payload() -> impl Strategy<Value = Payload> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..300).prop_map(Payload::RawBytes),
        (
            proptest::option::of((
                proptest::option::of(any::<i32>()),
                proptest::option::of(arb_addr()),
                proptest::option::of(arb_addr())
            )),
            proptest::option::of(any::<i32>()),
            proptest::option::of("[ -~]{0,20}"),
        )
            .prop_map(|(nt, queue_id, gpu_pci_addr)| {
                Payload::FlowSteerRuleRequest(FlowSteerRuleRequest {
                    flow_steer_ntuple: nt.map(|(flow_type, src, dst)| FlowSteerNtupleProto {
                        flow_type,
                        src,
                        dst,
                    }),
                    queue_id,
                    gpu_pci_addr,
                })
            }),
        "[ -~]{0,40}".prop_map(|gpu_pci_addr| Payload::QueueIdQuery(QueueIdQuery { gpu_pci_addr })),
        proptest::collection::vec(any::<i32>(), 0..40)
            .prop_map(|queue_ids| Payload::QueueIdResponse(QueueIdResponse { queue_ids })),
        proptest::option::of(any::<bool>()).prop_map(|register_client| {
            Payload::ApplicationRegisterRequest(ApplicationRegisterRequest { register_client })
        }),
    ]
}

proptest! {
    #[test]
    fn any_message_round_trips_through_a_frame(
        payload in proptest::option::of(arb_payload()),
        status in proptest::option::of((any::<i32>(), "[ -~]{0,30}")),
    ) {
        let msg = UnixSocketProto {
            payload,
            status: status.map(|(code, message)| RpcStatus { code, message }),
        };
        let frame = encode_frame(&msg).unwrap();
        prop_assert_eq!(parse_header(&frame, usize::MAX).unwrap(), frame.len() - HEADER_LEN);
        let (back, used) = parse_frame(&frame).unwrap();
        prop_assert_eq!(used, frame.len());
        prop_assert_eq!(back, msg);
    }

    #[test]
    fn hostile_bytes_never_panic(
        mut bytes in proptest::collection::vec(any::<u8>(), 0..600),
        framed in any::<bool>(),
    ) {
        if framed {
            // A correct header, so the payload decoder sees the garbage.
            let len = u16::try_from(bytes.len()).unwrap().to_be_bytes();
            bytes.splice(0..0, len);
        }
        if let Ok((msg, used)) = parse_frame(&bytes) {
            prop_assert!(used <= bytes.len() && used >= HEADER_LEN);
            // What parses re-encodes to a frame that parses the same.
            if let Ok(again) = encode_frame(&msg) {
                prop_assert_eq!(parse_frame(&again).unwrap().0, msg);
            }
        }
        let _ = PoolMetadata::from_bytes(&bytes);
    }

    #[test]
    fn flow_rules_round_trip(
        v6 in any::<bool>(),
        a in any::<[u8; 16]>(), b in any::<[u8; 16]>(),
        sp in any::<u16>(), dp in any::<u16>(),
        q in proptest::option::of(0i32..1000),
    ) {
        use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
        let ip = |x: [u8; 16]| -> IpAddr {
            if v6 { Ipv6Addr::from(x).into() } else { Ipv4Addr::new(x[0], x[1], x[2], x[3]).into() }
        };
        let mut rule = FlowRule::for_accepted(SocketAddr::new(ip(a), dp), SocketAddr::new(ip(b), sp))
            .with_gpu(PCI);
        rule.queue_id = q;
        let frame = encode_frame(&UnixSocketProto::with(Payload::FlowSteerRuleRequest(rule.to_proto().unwrap()))).unwrap();
        let (m, _) = parse_frame(&frame).unwrap();
        let Some(Payload::FlowSteerRuleRequest(req)) = m.payload else {
            return Err(TestCaseError::fail("wrong kind"));
        };
        prop_assert_eq!(FlowRule::from_proto(&req), Some(rule));
    }
}

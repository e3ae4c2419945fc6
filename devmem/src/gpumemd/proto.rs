//! The daemon's proto2 messages (`unix_socket_proto.proto`), derived by hand
//! with `prost` so no protoc is needed. Field numbers and wire types must
//! match the original byte for byte; the golden tests pin them.
//!
//! proto2 rules that matter here: `optional` scalars have presence
//! (`Option<T>`), `repeated int32` is *unpacked* by default, fields are
//! serialized in field-number order.
#![forbid(unsafe_code)]

/// `google.rpc.Status`, which the daemon (not the plugin) attaches as field 5
/// to error replies. The plugin's copy of the proto reserves 5; we decode it
/// to give better error messages and never send it.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct RpcStatus {
    #[prost(int32, tag = "1")]
    pub code: i32,
    #[prost(string, tag = "2")]
    pub message: String,
}

/// The top-level message of every proto frame.
#[derive(Clone, PartialEq, prost::Message)]
pub struct UnixSocketProto {
    #[prost(oneof = "Payload", tags = "1, 2, 3, 4, 6")]
    pub payload: Option<Payload>,
    /// Only in the daemon's error replies.
    #[prost(message, optional, tag = "5")]
    pub status: Option<RpcStatus>,
}

/// `oneof proto_payload_oneof`.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Payload {
    #[prost(bytes = "vec", tag = "1")]
    RawBytes(Vec<u8>),
    #[prost(message, tag = "2")]
    FlowSteerRuleRequest(FlowSteerRuleRequest),
    #[prost(message, tag = "3")]
    QueueIdQuery(QueueIdQuery),
    #[prost(message, tag = "4")]
    QueueIdResponse(QueueIdResponse),
    #[prost(message, tag = "6")]
    ApplicationRegisterRequest(ApplicationRegisterRequest),
}

#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct QueueIdQuery {
    #[prost(string, required, tag = "1")]
    pub gpu_pci_addr: String,
}

#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct QueueIdResponse {
    /// proto2 `repeated int32` without `[packed=true]`: one tag per element.
    #[prost(int32, repeated, packed = "false", tag = "1")]
    pub queue_ids: Vec<i32>,
}

#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct FlowSteerRuleRequest {
    #[prost(message, optional, tag = "1")]
    pub flow_steer_ntuple: Option<FlowSteerNtupleProto>,
    #[prost(int32, optional, tag = "2")]
    pub queue_id: Option<i32>,
    #[prost(string, optional, tag = "3")]
    pub gpu_pci_addr: Option<String>,
}

#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct FlowSteerNtupleProto {
    /// ethtool flow type: `TCP_V4_FLOW` (1) or `TCP_V6_FLOW` (5).
    #[prost(int32, optional, tag = "1")]
    pub flow_type: Option<i32>,
    #[prost(message, optional, tag = "2")]
    pub src: Option<SocketAddress>,
    #[prost(message, optional, tag = "3")]
    pub dst: Option<SocketAddress>,
}

/// `FlowSteerNtupleProto.SocketAddress`.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct SocketAddress {
    /// Presentation form, e.g. `192.168.0.1`.
    #[prost(string, optional, tag = "1")]
    pub ip_address: Option<String>,
    /// Host order.
    #[prost(int32, optional, tag = "2")]
    pub port: Option<i32>,
}

#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct ApplicationRegisterRequest {
    #[prost(bool, optional, tag = "1")]
    pub register_client: Option<bool>,
}

/// ethtool `TCP_V4_FLOW` (linux/ethtool.h).
pub const TCP_V4_FLOW: i32 = 0x01;
/// ethtool `TCP_V6_FLOW` (linux/ethtool.h).
pub const TCP_V6_FLOW: i32 = 0x05;

impl UnixSocketProto {
    /// A message carrying only `raw_bytes`.
    pub fn raw(bytes: impl Into<Vec<u8>>) -> Self {
        Self::with(Payload::RawBytes(bytes.into()))
    }

    /// A message carrying `payload` and no status.
    pub fn with(payload: Payload) -> Self {
        Self {
            payload: Some(payload),
            status: None,
        }
    }

    /// Name of the oneof case, for error messages.
    pub fn kind(&self) -> &'static str {
        match &self.payload {
            None => "empty (unknown or missing oneof field)",
            Some(Payload::RawBytes(_)) => "raw_bytes",
            Some(Payload::FlowSteerRuleRequest(_)) => "flow_steer_rule_request",
            Some(Payload::QueueIdQuery(_)) => "queue_id_query",
            Some(Payload::QueueIdResponse(_)) => "queue_id_response",
            Some(Payload::ApplicationRegisterRequest(_)) => "application_register_request",
        }
    }

    /// `raw_bytes` if that is the case set.
    pub fn raw_bytes(&self) -> Option<&[u8]> {
        match &self.payload {
            Some(Payload::RawBytes(b)) => Some(b),
            _ => None,
        }
    }
}

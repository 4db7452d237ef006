//! The publish wire format: multipart ZeroMQ messages any language can read.
//!
//! ```text
//! frame 0   topic, ASCII ("volume", "status", …)
//! frame 1   JSON header; its "payloads" list describes frames 2…:
//!           [{"name": "data", "dtype": "float32", "shape": [64, 64, 36], "order": "F"}]
//! frame 2…  little-endian binary payloads, one per entry
//! ```
//!
//! In Python: `np.frombuffer(frames[2], "<f4").reshape(shape, order=order)`.

use serde_json::{json, Map, Value};

use crate::volume::f32_le_bytes;

/// One binary payload of a message.
#[derive(Clone, Debug, PartialEq)]
pub struct Payload {
    /// Name in the header.
    pub name: String,
    /// numpy dtype name.
    pub dtype: &'static str,
    /// Array shape.
    pub shape: Vec<usize>,
    /// `"F"` (first axis fastest) or `"C"`.
    pub order: &'static str,
    /// Little-endian bytes.
    pub bytes: Vec<u8>,
}

impl Payload {
    /// A float32 array payload.
    pub fn f32(name: &str, shape: Vec<usize>, order: &'static str, values: &[f32]) -> Payload {
        Payload { name: name.to_string(), dtype: "float32", shape, order, bytes: f32_le_bytes(values) }
    }

    /// A one-dimensional uint32 array payload.
    pub fn u32(name: &str, values: &[u32]) -> Payload {
        let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        Payload { name: name.to_string(), dtype: "uint32", shape: vec![values.len()], order: "C", bytes }
    }
}

/// A message ready to publish.
#[derive(Clone, Debug, PartialEq)]
pub struct Message {
    /// Topic (frame 0).
    pub topic: &'static str,
    /// Header fields (frame 1; `payloads` is added on encoding).
    pub header: Map<String, Value>,
    /// Binary payloads (frames 2…).
    pub payloads: Vec<Payload>,
}

impl Message {
    /// The header as sent, with the payload descriptions filled in.
    pub fn full_header(&self) -> Value {
        let mut h = self.header.clone();
        let descr: Vec<Value> = self
            .payloads
            .iter()
            .map(|p| json!({"name": p.name, "dtype": p.dtype, "shape": p.shape, "order": p.order, "nbytes": p.bytes.len()}))
            .collect();
        h.insert("payloads".into(), Value::Array(descr));
        Value::Object(h)
    }

    /// Encodes the message into its frames.
    pub fn into_frames(self) -> (Value, Vec<Vec<u8>>) {
        let header = self.full_header();
        let mut frames = Vec::with_capacity(2 + self.payloads.len());
        frames.push(self.topic.as_bytes().to_vec());
        frames.push(header.to_string().into_bytes());
        frames.extend(self.payloads.into_iter().map(|p| p.bytes));
        (header, frames)
    }
}

/// A received message, decoded and checked against its header.
#[derive(Clone, Debug, PartialEq)]
pub struct Received {
    /// Topic.
    pub topic: String,
    /// Header.
    pub header: Value,
    /// Payloads by position, each with its declared name and shape.
    pub payloads: Vec<(String, Vec<usize>, Vec<u8>)>,
}

impl Received {
    /// Decodes frames from a subscriber socket.
    pub fn decode(frames: &[Vec<u8>]) -> Result<Received, String> {
        let [topic, header, rest @ ..] = frames else {
            return Err(format!("{} frames; a message has at least topic and header", frames.len()));
        };
        let topic = String::from_utf8(topic.clone()).map_err(|_| "topic is not UTF-8".to_string())?;
        let header: Value = serde_json::from_slice(header).map_err(|e| format!("header: {e}"))?;
        let descr = header.get("payloads").and_then(Value::as_array).cloned().unwrap_or_default();
        if descr.len() != rest.len() {
            return Err(format!("header lists {} payloads, {} frames follow", descr.len(), rest.len()));
        }
        let mut payloads = Vec::with_capacity(rest.len());
        for (d, bytes) in descr.iter().zip(rest) {
            let name = d.get("name").and_then(Value::as_str).unwrap_or_default().to_string();
            let shape: Vec<usize> = d
                .get("shape")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(|x| x.as_u64().map(|v| v as usize)).collect())
                .unwrap_or_default();
            let width = match d.get("dtype").and_then(Value::as_str) {
                Some("float32") | Some("uint32") => 4,
                Some("uint8") => 1,
                Some("float64") => 8,
                other => return Err(format!("payload {name}: dtype {other:?}")),
            };
            if shape.iter().product::<usize>() * width != bytes.len() {
                return Err(format!("payload {name}: {} bytes do not match shape {shape:?}", bytes.len()));
            }
            payloads.push((name, shape, bytes.clone()));
        }
        Ok(Received { topic, header, payloads })
    }

    /// Payload `name` as u32 values.
    pub fn u32_payload(&self, name: &str) -> Option<Vec<u32>> {
        let (_, _, b) = self.payloads.iter().find(|(n, _, _)| n == name)?;
        Some(crate::volume::u32_from_le_bytes(b))
    }

    /// Payload `name` as f32 values.
    pub fn f32_payload(&self, name: &str) -> Option<Vec<f32>> {
        let (_, _, b) = self.payloads.iter().find(|(n, _, _)| n == name)?;
        Some(crate::volume::f32_from_le_bytes(b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_decode_round_trip() {
        let mut header = Map::new();
        header.insert("index".into(), json!(4));
        let m = Message {
            topic: "volume",
            header,
            payloads: vec![Payload::f32("data", vec![2, 3], "F", &[1.0, 2.0, 3.0, 4.0, 5.0, 6.5])],
        };
        let (h, frames) = m.into_frames();
        assert_eq!(frames.len(), 3);
        assert_eq!(h["payloads"][0]["nbytes"], 24);
        let r = Received::decode(&frames).unwrap();
        assert_eq!(r.topic, "volume");
        assert_eq!(r.header["index"], 4);
        assert_eq!(r.f32_payload("data").unwrap(), vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.5]);
        let mut bad = frames.clone();
        bad[2].pop();
        assert!(Received::decode(&bad).is_err());
        assert!(Received::decode(&frames[..2]).is_err());
    }
}

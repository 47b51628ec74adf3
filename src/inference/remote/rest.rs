//! The V2 REST encoding: JSON tensors (`data` row-major, flat or nested).

use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

use super::Tensor;
use crate::inference::engine::FloatTensor;

#[derive(Serialize)]
struct InferRequest<'a> {
    inputs: [RequestInput<'a>; 1],
    outputs: Vec<RequestOutput<'a>>,
}

#[derive(Serialize)]
struct RequestInput<'a> {
    name: &'a str,
    shape: &'a [usize],
    datatype: &'static str,
    data: &'a [f32],
}

#[derive(Serialize)]
struct RequestOutput<'a> {
    name: &'a str,
}

#[derive(Deserialize)]
struct InferResponse {
    outputs: Vec<ResponseOutput>,
}

#[derive(Deserialize)]
struct ResponseOutput {
    name: String,
    shape: Vec<usize>,
    datatype: String,
    data: Flat,
}

/// Tensor data as the protocol allows it in JSON: row-major, flat or nested.
struct Flat(Vec<f32>);

impl<'de> Deserialize<'de> for Flat {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut out = Vec::new();
        d.deserialize_seq(Sink(&mut out))?;
        Ok(Flat(out))
    }
}

/// Appends every number of a (nested) array, without buffering the elements.
struct Sink<'v>(&'v mut Vec<f32>);

impl<'de> DeserializeSeed<'de> for Sink<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Sink<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array of numbers, flat or nested")
    }
    fn visit_f64<E>(self, v: f64) -> Result<(), E> {
        self.0.push(v as f32);
        Ok(())
    }
    fn visit_i64<E>(self, v: i64) -> Result<(), E> {
        self.0.push(v as f32);
        Ok(())
    }
    fn visit_u64<E>(self, v: u64) -> Result<(), E> {
        self.0.push(v as f32);
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(Sink(self.0))?.is_some() {}
        Ok(())
    }
    /// serde_json with `arbitrary_precision` (a dependency turns it on) hands numbers to
    /// `deserialize_any` as a one-entry map holding the number's text.
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let Some((_, text)) = map.next_entry::<serde::de::IgnoredAny, String>()? else {
            return Err(serde::de::Error::custom("an empty object is not a number"));
        };
        let v: f64 = text
            .parse()
            .map_err(|_| serde::de::Error::custom(format!("'{text}' is not a number")))?;
        self.0.push(v as f32);
        Ok(())
    }
}

/// The request body: the input as FP32, the outputs asked for by name.
///
/// # Errors
/// Only if serialisation fails (it does not for finite floats).
pub(super) fn encode(
    input_name: &str,
    input: &FloatTensor,
    outputs: &[String],
) -> Result<Vec<u8>, String> {
    serde_json::to_vec(&InferRequest {
        inputs: [RequestInput {
            name: input_name,
            shape: &input.shape,
            datatype: "FP32",
            data: &input.data,
        }],
        outputs: outputs.iter().map(|name| RequestOutput { name }).collect(),
    })
    .map_err(|e| e.to_string())
}

/// The output tensors of an answer body.
///
/// # Errors
/// A message when the body is not a V2 inference answer.
pub(super) fn decode(body: &[u8]) -> Result<Vec<Tensor>, String> {
    let res: InferResponse =
        serde_json::from_slice(body).map_err(|e| format!("not a V2 inference answer: {e}"))?;
    Ok(res
        .outputs
        .into_iter()
        .map(|o| Tensor {
            name: o.name,
            datatype: o.datatype,
            shape: o.shape,
            data: o.data.0,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensor_data_may_be_flat_or_nested() {
        let flat: Flat = serde_json::from_str("[1, 2.5, -3]").unwrap();
        assert_eq!(flat.0, vec![1.0, 2.5, -3.0]);
        let nested: Flat = serde_json::from_str("[[1, 2], [3, [4, 5]]]").unwrap();
        assert_eq!(nested.0, vec![1.0, 2.0, 3.0, 4.0, 5.0]);
        assert!(serde_json::from_str::<Flat>("[1, \"x\"]").is_err());
    }
}

//! The V2 gRPC encoding: `inference.GRPCInferenceService/ModelInfer` with the messages of
//! `grpc_predict_v2.proto` (KServe; Triton's `grpc_service.proto` has the same fields). Only the
//! fields Carina uses are declared; protobuf decoding skips the others. The input goes as
//! `contents.fp32_contents` (packed floats: every V2 server accepts it); outputs are read from
//! `raw_output_contents` (Triton's habit, little-endian) or `contents`.

use prost::Message;

use super::Tensor;
use crate::inference::engine::FloatTensor;

/// The method's path.
pub(super) const MODEL_INFER: &str = "/inference.GRPCInferenceService/ModelInfer";

#[derive(Clone, PartialEq, Message)]
struct ModelInferRequest {
    #[prost(string, tag = "1")]
    model_name: String,
    #[prost(string, tag = "2")]
    model_version: String,
    #[prost(message, repeated, tag = "5")]
    inputs: Vec<InferTensor>,
    #[prost(message, repeated, tag = "6")]
    outputs: Vec<InferRequestedOutputTensor>,
}

/// `InferInputTensor` and `InferOutputTensor`: the same fields, the same numbers.
#[derive(Clone, PartialEq, Message)]
struct InferTensor {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(string, tag = "2")]
    datatype: String,
    #[prost(int64, repeated, tag = "3")]
    shape: Vec<i64>,
    #[prost(message, optional, tag = "5")]
    contents: Option<InferTensorContents>,
}

#[derive(Clone, PartialEq, Message)]
struct InferRequestedOutputTensor {
    #[prost(string, tag = "1")]
    name: String,
}

#[derive(Clone, PartialEq, Message)]
struct InferTensorContents {
    #[prost(float, repeated, tag = "6")]
    fp32_contents: Vec<f32>,
    #[prost(double, repeated, tag = "7")]
    fp64_contents: Vec<f64>,
}

#[derive(Clone, PartialEq, Message)]
struct ModelInferResponse {
    #[prost(message, repeated, tag = "5")]
    outputs: Vec<InferTensor>,
    #[prost(bytes = "vec", repeated, tag = "6")]
    raw_output_contents: Vec<Vec<u8>>,
}

/// The encoded `ModelInferRequest`.
pub(super) fn encode(
    model: &str,
    version: &str,
    input_name: &str,
    input: &FloatTensor,
    outputs: &[String],
) -> Vec<u8> {
    ModelInferRequest {
        model_name: model.to_string(),
        model_version: version.to_string(),
        inputs: vec![InferTensor {
            name: input_name.to_string(),
            datatype: "FP32".into(),
            shape: input.shape.iter().map(|&d| d as i64).collect(),
            contents: Some(InferTensorContents {
                fp32_contents: input.data.clone(),
                fp64_contents: Vec::new(),
            }),
        }],
        outputs: outputs
            .iter()
            .map(|name| InferRequestedOutputTensor { name: name.clone() })
            .collect(),
    }
    .encode_to_vec()
}

/// The output tensors of an encoded `ModelInferResponse`.
///
/// # Errors
/// A message when it does not decode or a raw output is not whole floats.
pub(super) fn decode(message: &[u8]) -> Result<Vec<Tensor>, String> {
    let res = ModelInferResponse::decode(message)
        .map_err(|e| format!("not a ModelInferResponse: {e}"))?;
    let raw = res.raw_output_contents;
    res.outputs
        .into_iter()
        .enumerate()
        .map(|(i, o)| {
            let data = match (raw.get(i), o.contents) {
                (Some(bytes), _) => raw_floats(&o.name, &o.datatype, bytes)?,
                (None, Some(c)) if !c.fp32_contents.is_empty() => c.fp32_contents,
                (None, Some(c)) => c.fp64_contents.iter().map(|&v| v as f32).collect(),
                (None, None) => Vec::new(),
            };
            Ok(Tensor {
                name: o.name,
                datatype: o.datatype,
                shape: o.shape.iter().map(|&d| d.max(0) as usize).collect(),
                data,
            })
        })
        .collect()
}

/// Little-endian FP32 or FP64 values.
fn raw_floats(name: &str, datatype: &str, bytes: &[u8]) -> Result<Vec<f32>, String> {
    let width = match datatype {
        "FP32" => 4,
        "FP64" => 8,
        other => return Err(format!("raw output '{name}' is {other}, not FP32/FP64")),
    };
    if bytes.len() % width != 0 {
        return Err(format!(
            "raw output '{name}' is not whole {datatype} values"
        ));
    }
    Ok(bytes
        .chunks_exact(width)
        .map(|c| match c {
            [a, b, c, d] => f32::from_le_bytes([*a, *b, *c, *d]),
            _ => {
                let mut v = [0u8; 8];
                v.copy_from_slice(c);
                f64::from_le_bytes(v) as f32
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outputs_are_read_from_contents_or_raw_bytes() {
        let res = ModelInferResponse {
            outputs: vec![
                InferTensor {
                    name: "probs".into(),
                    datatype: "FP32".into(),
                    shape: vec![1, 3],
                    contents: Some(InferTensorContents {
                        fp32_contents: vec![0.25, 0.5, 0.25],
                        fp64_contents: Vec::new(),
                    }),
                },
                InferTensor {
                    name: "features".into(),
                    datatype: "FP64".into(),
                    shape: vec![1, 2],
                    contents: None,
                },
            ],
            raw_output_contents: Vec::new(),
        };
        let got = decode(&res.encode_to_vec()).unwrap();
        assert_eq!(got[0].data, vec![0.25, 0.5, 0.25]);
        assert!(
            got[1].data.is_empty(),
            "no contents: the shape check will refuse it"
        );
        let raw = ModelInferResponse {
            outputs: vec![InferTensor {
                name: "f".into(),
                datatype: "FP32".into(),
                shape: vec![2],
                contents: None,
            }],
            raw_output_contents: vec![[1.5f32.to_le_bytes(), (-2f32).to_le_bytes()].concat()],
        };
        assert_eq!(
            decode(&raw.encode_to_vec()).unwrap()[0].data,
            vec![1.5, -2.0]
        );
        let bad = ModelInferResponse {
            raw_output_contents: vec![vec![0; 5]],
            ..raw
        };
        assert!(decode(&bad.encode_to_vec()).is_err());
    }
}

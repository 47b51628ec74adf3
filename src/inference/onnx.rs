//! The few parts of the ONNX protobuf schema Carina reads: the graph's nodes, initializers and
//! outputs, so that it can find the Grad-CAM target tensor, differentiate the classifier head,
//! expose an intermediate tensor as an extra output, and cut the head out as a model of its own.
//!
//! Field numbers follow `onnx.proto3`. Decoding ignores fields that are not listed here, so the
//! original model bytes are never re-encoded from this subset: extra outputs are added by
//! appending a `ModelProto` fragment, which protobuf merges into the first message.

use std::collections::{HashMap, HashSet};

use prost::Message;

/// ONNX `TensorProto.DataType` FLOAT.
pub const FLOAT: i32 = 1;
/// ONNX `TensorProto.DataType` INT64.
pub const INT64: i32 = 7;
/// ONNX `TensorProto.DataType` INT32.
pub const INT32: i32 = 6;
/// ONNX `TensorProto.DataType` DOUBLE.
pub const DOUBLE: i32 = 11;

/// `ModelProto`.
#[derive(Clone, PartialEq, Message)]
pub struct ModelProto {
    /// IR version.
    #[prost(int64, tag = "1")]
    pub ir_version: i64,
    /// Operator sets the graph uses.
    #[prost(message, repeated, tag = "8")]
    pub opset_import: Vec<OperatorSetId>,
    /// The graph.
    #[prost(message, optional, tag = "7")]
    pub graph: Option<GraphProto>,
}

/// `OperatorSetIdProto`.
#[derive(Clone, PartialEq, Message)]
pub struct OperatorSetId {
    /// Domain ("" = ai.onnx).
    #[prost(string, tag = "1")]
    pub domain: String,
    /// Opset version.
    #[prost(int64, tag = "2")]
    pub version: i64,
}

/// `GraphProto`.
#[derive(Clone, PartialEq, Message)]
pub struct GraphProto {
    /// Nodes in topological order.
    #[prost(message, repeated, tag = "1")]
    pub node: Vec<NodeProto>,
    /// Graph name.
    #[prost(string, tag = "2")]
    pub name: String,
    /// Constant tensors (weights).
    #[prost(message, repeated, tag = "5")]
    pub initializer: Vec<TensorProto>,
    /// Graph inputs.
    #[prost(message, repeated, tag = "11")]
    pub input: Vec<ValueInfoProto>,
    /// Graph outputs.
    #[prost(message, repeated, tag = "12")]
    pub output: Vec<ValueInfoProto>,
}

/// `NodeProto`.
#[derive(Clone, PartialEq, Message)]
pub struct NodeProto {
    /// Input tensor names.
    #[prost(string, repeated, tag = "1")]
    pub input: Vec<String>,
    /// Output tensor names.
    #[prost(string, repeated, tag = "2")]
    pub output: Vec<String>,
    /// Node name.
    #[prost(string, tag = "3")]
    pub name: String,
    /// Operator type, e.g. `Gemm`.
    #[prost(string, tag = "4")]
    pub op_type: String,
    /// Attributes.
    #[prost(message, repeated, tag = "5")]
    pub attribute: Vec<AttributeProto>,
    /// Operator domain.
    #[prost(string, tag = "7")]
    pub domain: String,
}

/// `AttributeProto` (all value kinds a head can carry, so a node re-encodes faithfully).
#[derive(Clone, PartialEq, Message)]
pub struct AttributeProto {
    /// Attribute name.
    #[prost(string, tag = "1")]
    pub name: String,
    /// Float value.
    #[prost(float, tag = "2")]
    pub f: f32,
    /// Integer value.
    #[prost(int64, tag = "3")]
    pub i: i64,
    /// Bytes value.
    #[prost(bytes = "vec", tag = "4")]
    pub s: Vec<u8>,
    /// Tensor value.
    #[prost(message, optional, tag = "5")]
    pub t: Option<TensorProto>,
    /// Float list.
    #[prost(float, repeated, tag = "7")]
    pub floats: Vec<f32>,
    /// Integer list.
    #[prost(int64, repeated, tag = "8")]
    pub ints: Vec<i64>,
    /// Bytes list.
    #[prost(bytes = "vec", repeated, tag = "9")]
    pub strings: Vec<Vec<u8>>,
    /// `AttributeType` enum value.
    #[prost(int32, tag = "20")]
    pub r#type: i32,
}

/// `TensorProto` (dense tensors; external data is not supported).
#[derive(Clone, PartialEq, Message)]
pub struct TensorProto {
    /// Shape.
    #[prost(int64, repeated, tag = "1")]
    pub dims: Vec<i64>,
    /// Element type.
    #[prost(int32, tag = "2")]
    pub data_type: i32,
    /// FLOAT data when not in `raw_data`.
    #[prost(float, repeated, tag = "4")]
    pub float_data: Vec<f32>,
    /// INT32-like data.
    #[prost(int32, repeated, tag = "5")]
    pub int32_data: Vec<i32>,
    /// INT64 data.
    #[prost(int64, repeated, tag = "7")]
    pub int64_data: Vec<i64>,
    /// Tensor name.
    #[prost(string, tag = "8")]
    pub name: String,
    /// Little-endian raw bytes.
    #[prost(bytes = "vec", tag = "9")]
    pub raw_data: Vec<u8>,
    /// DOUBLE data.
    #[prost(double, repeated, tag = "10")]
    pub double_data: Vec<f64>,
    /// 1 = external data (unsupported here).
    #[prost(int32, tag = "14")]
    pub data_location: i32,
}

/// `ValueInfoProto`.
#[derive(Clone, PartialEq, Message)]
pub struct ValueInfoProto {
    /// Tensor name.
    #[prost(string, tag = "1")]
    pub name: String,
    /// Type.
    #[prost(message, optional, tag = "2")]
    pub r#type: Option<TypeProto>,
}

/// `TypeProto` (tensor types only).
#[derive(Clone, PartialEq, Message)]
pub struct TypeProto {
    /// Tensor type.
    #[prost(message, optional, tag = "1")]
    pub tensor_type: Option<TensorTypeProto>,
}

/// `TypeProto.Tensor`.
#[derive(Clone, PartialEq, Message)]
pub struct TensorTypeProto {
    /// Element type.
    #[prost(int32, tag = "1")]
    pub elem_type: i32,
    /// Shape, when known.
    #[prost(message, optional, tag = "2")]
    pub shape: Option<TensorShapeProto>,
}

/// `TensorShapeProto`.
#[derive(Clone, PartialEq, Message)]
pub struct TensorShapeProto {
    /// Dimensions.
    #[prost(message, repeated, tag = "1")]
    pub dim: Vec<Dimension>,
}

/// `TensorShapeProto.Dimension`.
#[derive(Clone, PartialEq, Message)]
pub struct Dimension {
    /// Fixed size.
    #[prost(int64, optional, tag = "1")]
    pub dim_value: Option<i64>,
    /// Symbolic size.
    #[prost(string, optional, tag = "2")]
    pub dim_param: Option<String>,
}

/// Why a model file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum OnnxError {
    /// Not a protobuf `ModelProto`.
    #[error("not an ONNX model: {0}")]
    Decode(#[from] prost::DecodeError),
    /// The model has no graph.
    #[error("the ONNX model has no graph")]
    NoGraph,
    /// A tensor could not be read.
    #[error("tensor '{0}': {1}")]
    Tensor(String, String),
}

/// A decoded model plus lookup tables.
pub struct OnnxGraph {
    /// The decoded subset.
    pub model: ModelProto,
    producers: HashMap<String, usize>,
    initializers: HashMap<String, usize>,
}

impl OnnxGraph {
    /// Decodes the subset of a model file.
    ///
    /// # Errors
    /// When the bytes are not an ONNX model with a graph.
    pub fn decode(bytes: &[u8]) -> Result<Self, OnnxError> {
        let model = ModelProto::decode(bytes)?;
        let graph = model.graph.as_ref().ok_or(OnnxError::NoGraph)?;
        let mut producers = HashMap::new();
        for (i, n) in graph.node.iter().enumerate() {
            for o in &n.output {
                producers.insert(o.clone(), i);
            }
        }
        let initializers = graph
            .initializer
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Ok(Self {
            model,
            producers,
            initializers,
        })
    }

    /// The graph (decode guarantees one).
    pub fn graph(&self) -> &GraphProto {
        static EMPTY: GraphProto = GraphProto {
            node: Vec::new(),
            name: String::new(),
            initializer: Vec::new(),
            input: Vec::new(),
            output: Vec::new(),
        };
        self.model.graph.as_ref().unwrap_or(&EMPTY)
    }

    /// The node that produces `tensor`, if any.
    pub fn producer(&self, tensor: &str) -> Option<&NodeProto> {
        self.producers.get(tensor).map(|&i| &self.graph().node[i])
    }

    /// Index of the producing node.
    pub fn producer_index(&self, tensor: &str) -> Option<usize> {
        self.producers.get(tensor).copied()
    }

    /// A constant tensor: an initializer or the value of a `Constant` node.
    pub fn constant(&self, tensor: &str) -> Option<&TensorProto> {
        if let Some(&i) = self.initializers.get(tensor) {
            return Some(&self.graph().initializer[i]);
        }
        let node = self.producer(tensor)?;
        if node.op_type != "Constant" {
            return None;
        }
        node.attribute
            .iter()
            .find(|a| a.name == "value")
            .and_then(|a| a.t.as_ref())
    }

    /// Whether `tensor` is a graph output already.
    pub fn is_output(&self, tensor: &str) -> bool {
        self.graph().output.iter().any(|o| o.name == tensor)
    }

    /// Whether any node produces `tensor` or it is a graph input.
    pub fn has_tensor(&self, tensor: &str) -> bool {
        self.producers.contains_key(tensor) || self.graph().input.iter().any(|i| i.name == tensor)
    }

    /// The default-domain opset version.
    pub fn opset(&self) -> i64 {
        self.model
            .opset_import
            .iter()
            .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
            .map_or(0, |o| o.version)
    }

    /// Nodes (indices, graph order) on a path from `from` to `to`: descendants of `from` that are
    /// also ancestors of `to`, plus the `Constant` nodes they read.
    pub fn path_nodes(&self, from: &str, to: &str) -> Vec<usize> {
        let nodes = &self.graph().node;
        let mut reach: HashSet<&str> = HashSet::from([from]);
        let mut desc = vec![false; nodes.len()];
        for (i, n) in nodes.iter().enumerate() {
            if n.input.iter().any(|x| reach.contains(x.as_str())) {
                desc[i] = true;
                reach.extend(n.output.iter().map(String::as_str));
            }
        }
        let mut needed: HashSet<&str> = HashSet::from([to]);
        let mut keep = vec![false; nodes.len()];
        for (i, n) in nodes.iter().enumerate().rev() {
            if n.output.iter().any(|o| needed.contains(o.as_str()))
                && (desc[i] || n.op_type == "Constant")
            {
                keep[i] = true;
                needed.extend(n.input.iter().map(String::as_str));
            }
        }
        (0..nodes.len()).filter(|&i| keep[i]).collect()
    }

    /// Auto-detects the Grad-CAM target: the 4-D input of the last global pooling node (or
    /// spatial `ReduceMean`) on the way to `score`.
    pub fn find_pooling_input(&self, score: &str) -> Option<String> {
        let mut frontier = vec![score.to_string()];
        let mut seen = HashSet::new();
        while let Some(t) = frontier.pop() {
            let Some(idx) = self.producer_index(&t) else {
                continue;
            };
            if !seen.insert(idx) {
                continue;
            }
            let node = &self.graph().node[idx];
            let pooling = matches!(node.op_type.as_str(), "GlobalAveragePool" | "GlobalMaxPool")
                || (node.op_type == "ReduceMean" && self.reduces_spatial(node));
            if pooling {
                return node.input.first().cloned();
            }
            frontier.extend(
                node.input
                    .iter()
                    .filter(|i| self.constant(i).is_none())
                    .cloned(),
            );
        }
        None
    }

    fn reduces_spatial(&self, node: &NodeProto) -> bool {
        let axes = node
            .attribute
            .iter()
            .find(|a| a.name == "axes")
            .map(|a| a.ints.clone())
            .or_else(|| {
                node.input
                    .get(1)
                    .and_then(|n| self.constant(n))
                    .and_then(|t| tensor_i64(t).ok())
            });
        matches!(
            axes.as_deref(),
            Some([2, 3]) | Some([-2, -1]) | Some([1, 2])
        )
    }
}

/// The bytes of `model` with `tensors` appended to the graph outputs (as FLOAT tensors).
pub fn with_extra_outputs(model: &[u8], tensors: &[&str]) -> Vec<u8> {
    let fragment = ModelProto {
        graph: Some(GraphProto {
            output: tensors.iter().map(|t| float_value_info(t)).collect(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut out = model.to_vec();
    fragment.encode(&mut out).unwrap_or_default(); // encoding into a Vec cannot run out of space
    out
}

/// A FLOAT tensor value-info with an unknown shape.
pub fn float_value_info(name: &str) -> ValueInfoProto {
    ValueInfoProto {
        name: name.to_string(),
        r#type: Some(TypeProto {
            tensor_type: Some(TensorTypeProto {
                elem_type: FLOAT,
                shape: None,
            }),
        }),
    }
}

/// Reads a FLOAT/DOUBLE tensor's values.
///
/// # Errors
/// For other element types or external data.
pub fn tensor_f32(t: &TensorProto) -> Result<Vec<f32>, OnnxError> {
    let err = |m: &str| OnnxError::Tensor(t.name.clone(), m.to_string());
    if t.data_location == 1 {
        return Err(err("external data is not supported"));
    }
    match t.data_type {
        FLOAT if !t.raw_data.is_empty() => Ok(t
            .raw_data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()),
        FLOAT => Ok(t.float_data.clone()),
        DOUBLE if !t.raw_data.is_empty() => Ok(t
            .raw_data
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32)
            .collect()),
        DOUBLE => Ok(t.double_data.iter().map(|&v| v as f32).collect()),
        other => Err(err(&format!("element type {other} is not float"))),
    }
}

/// Reads an INT64/INT32 tensor's values.
///
/// # Errors
/// For other element types.
pub fn tensor_i64(t: &TensorProto) -> Result<Vec<i64>, OnnxError> {
    let err = |m: &str| OnnxError::Tensor(t.name.clone(), m.to_string());
    match t.data_type {
        INT64 if !t.raw_data.is_empty() => Ok(t
            .raw_data
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect()),
        INT64 => Ok(t.int64_data.clone()),
        INT32 if !t.raw_data.is_empty() => Ok(t
            .raw_data
            .chunks_exact(4)
            .map(|c| i64::from(i32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .collect()),
        INT32 => Ok(t.int32_data.iter().map(|&v| i64::from(v)).collect()),
        other => Err(err(&format!("element type {other} is not an integer"))),
    }
}

/// An attribute's integer value.
pub fn attr_i(node: &NodeProto, name: &str) -> Option<i64> {
    node.attribute.iter().find(|a| a.name == name).map(|a| a.i)
}

/// An attribute's float value.
pub fn attr_f(node: &NodeProto, name: &str) -> Option<f32> {
    node.attribute.iter().find(|a| a.name == name).map(|a| a.f)
}

/// An attribute's integer list.
pub fn attr_ints(node: &NodeProto, name: &str) -> Option<Vec<i64>> {
    node.attribute
        .iter()
        .find(|a| a.name == name)
        .map(|a| a.ints.clone())
}

/// Builds a stand-alone model computing `outputs` from `input` with the given nodes, carrying the
/// initializers they read. Used to run a classifier head on modified feature maps.
pub fn extract_submodel(g: &OnnxGraph, nodes: &[usize], input: &str, outputs: &[&str]) -> Vec<u8> {
    let graph = g.graph();
    let picked: Vec<NodeProto> = nodes.iter().map(|&i| graph.node[i].clone()).collect();
    let used: HashSet<&str> = picked
        .iter()
        .flat_map(|n| n.input.iter().map(String::as_str))
        .collect();
    let initializer = graph
        .initializer
        .iter()
        .filter(|t| used.contains(t.name.as_str()))
        .cloned()
        .collect();
    let model = ModelProto {
        ir_version: g.model.ir_version,
        opset_import: g.model.opset_import.clone(),
        graph: Some(GraphProto {
            node: picked,
            name: "carina_head".into(),
            initializer,
            input: vec![float_value_info(input)],
            output: outputs.iter().map(|o| float_value_info(o)).collect(),
        }),
    };
    model.encode_to_vec()
}

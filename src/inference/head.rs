//! The classifier head as a small program: the ops from the Grad-CAM target tensor to the class
//! score, compiled from the ONNX graph at load time, evaluated forward in Rust and differentiated
//! in reverse mode. Supports what GAP/linear heads use: GlobalAveragePool, ReduceMean, Flatten,
//! Reshape, Squeeze, Unsqueeze, Gemm, MatMul, Add/Sub/Mul/Div by a constant, Relu, Sigmoid,
//! Softmax, BatchNormalization, Identity and Dropout. Anything else makes compilation fail, and
//! the caller falls back to a gradient-free method.

use std::collections::HashMap;

use ndarray::{Array2, ArrayD, Axis, Ix2, IxDyn};

use super::onnx::{
    attr_f, attr_i, attr_ints, tensor_f32, tensor_i64, NodeProto, OnnxGraph, TensorProto,
};

/// One compiled op: `y = f(x)` with constants folded in.
#[derive(Debug, Clone)]
enum Kind {
    GlobalAvgPool,
    ReduceMean {
        axes: Vec<i64>,
        keepdims: bool,
    },
    Flatten {
        axis: i64,
    },
    Reshape {
        shape: Vec<i64>,
    },
    Squeeze {
        axes: Option<Vec<i64>>,
    },
    Unsqueeze {
        axes: Vec<i64>,
    },
    /// `alpha * x @ w + beta * c` with `w` as [K, M].
    Linear {
        w: Array2<f32>,
        bias: Option<ArrayD<f32>>,
        alpha: f32,
        beta: f32,
    },
    AddConst {
        c: ArrayD<f32>,
        x_sign: f32,
    },
    MulConst {
        c: ArrayD<f32>,
    },
    Relu,
    Sigmoid,
    Softmax {
        axis: i64,
    },
    /// Per-channel (axis 1) affine map from BatchNormalization in inference mode.
    ChannelAffine {
        scale: Vec<f32>,
        shift: Vec<f32>,
    },
    Identity,
}

#[derive(Debug, Clone)]
struct Op {
    kind: Kind,
    x: String,
    y: String,
}

/// A compiled head from `target` to `score`.
#[derive(Debug, Clone)]
pub struct Head {
    ops: Vec<Op>,
    target: String,
    score: String,
}

/// Why a head cannot be differentiated here.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct HeadError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, HeadError> {
    Err(HeadError(msg.into()))
}

impl Head {
    /// Compiles the nodes between `target` and `score`.
    ///
    /// # Errors
    /// When a node is not supported, reads a non-constant second input, or the path is empty.
    pub fn compile(g: &OnnxGraph, target: &str, score: &str) -> Result<Self, HeadError> {
        let nodes = g.path_nodes(target, score);
        let graph = g.graph();
        let mut ops = Vec::new();
        for &i in &nodes {
            let node = &graph.node[i];
            if node.op_type == "Constant" {
                continue;
            }
            ops.push(compile_node(g, node, g.opset())?);
        }
        if ops.is_empty() {
            return err(format!("no path from '{target}' to '{score}'"));
        }
        let produced: Vec<&str> = ops.iter().map(|o| o.y.as_str()).collect();
        if !produced.contains(&score) {
            return err(format!("'{score}' is not reachable from '{target}'"));
        }
        for op in &ops {
            if op.x != target && !produced.contains(&op.x.as_str()) {
                return err(format!(
                    "the head reads '{}', which is not derived from the target",
                    op.x
                ));
            }
        }
        Ok(Self {
            ops,
            target: target.into(),
            score: score.into(),
        })
    }

    /// Runs the head forward from the target activation (batch 1), returning every value.
    ///
    /// # Errors
    /// On a shape the compiled ops cannot handle.
    pub fn forward(&self, a: ArrayD<f32>) -> Result<HashMap<String, ArrayD<f32>>, HeadError> {
        let mut values = HashMap::from([(self.target.clone(), a)]);
        for op in &self.ops {
            let x = values
                .get(&op.x)
                .ok_or_else(|| HeadError(format!("missing value '{}'", op.x)))?;
            let y = forward_op(&op.kind, x)?;
            values.insert(op.y.clone(), y);
        }
        Ok(values)
    }

    /// The score tensor computed by a forward pass.
    pub fn score<'a>(&self, values: &'a HashMap<String, ArrayD<f32>>) -> Option<&'a ArrayD<f32>> {
        values.get(&self.score)
    }

    /// ∂ score[0, class] / ∂ target, by reverse-mode differentiation over the forward values.
    ///
    /// # Errors
    /// When the class index is out of range or a shape is unexpected.
    pub fn gradient(
        &self,
        values: &HashMap<String, ArrayD<f32>>,
        class: usize,
    ) -> Result<ArrayD<f32>, HeadError> {
        let score = self
            .score(values)
            .ok_or_else(|| HeadError("no score value".into()))?;
        if score.ndim() != 2 || class >= score.shape()[1] {
            return err(format!(
                "score shape {:?} has no class {class}",
                score.shape()
            ));
        }
        let mut seed = ArrayD::zeros(score.raw_dim());
        seed[[0, class]] = 1.0;
        let mut grads: HashMap<String, ArrayD<f32>> = HashMap::from([(self.score.clone(), seed)]);
        for op in self.ops.iter().rev() {
            let Some(gy) = grads.remove(&op.y) else {
                continue;
            };
            let x = &values[&op.x];
            let y = &values[&op.y];
            let gx = backward_op(&op.kind, x, y, gy)?;
            match grads.get_mut(&op.x) {
                Some(acc) => *acc += &gx,
                None => {
                    grads.insert(op.x.clone(), gx);
                }
            }
        }
        grads
            .remove(&self.target)
            .ok_or_else(|| HeadError("the score does not depend on the target".into()))
    }
}

fn constant<'g>(g: &'g OnnxGraph, name: &str) -> Result<&'g TensorProto, HeadError> {
    g.constant(name)
        .ok_or_else(|| HeadError(format!("input '{name}' is not a constant")))
}

fn const_array(t: &TensorProto) -> Result<ArrayD<f32>, HeadError> {
    let data = tensor_f32(t).map_err(|e| HeadError(e.to_string()))?;
    let shape: Vec<usize> = t.dims.iter().map(|&d| d as usize).collect();
    ArrayD::from_shape_vec(IxDyn(&shape), data).map_err(|e| HeadError(e.to_string()))
}

fn const_ints(g: &OnnxGraph, name: &str) -> Result<Vec<i64>, HeadError> {
    tensor_i64(constant(g, name)?).map_err(|e| HeadError(e.to_string()))
}

fn compile_node(g: &OnnxGraph, n: &NodeProto, opset: i64) -> Result<Op, HeadError> {
    let x = n.input.first().cloned().unwrap_or_default();
    let y = n.output.first().cloned().unwrap_or_default();
    let second = n.input.get(1).filter(|s| !s.is_empty());
    let kind = match n.op_type.as_str() {
        "GlobalAveragePool" => Kind::GlobalAvgPool,
        "ReduceMean" => {
            let axes = match attr_ints(n, "axes") {
                Some(a) => a,
                None if opset >= 18 => match second {
                    Some(s) => const_ints(g, s)?,
                    None => return err("ReduceMean over all axes is not a head op"),
                },
                None => return err("ReduceMean without axes"),
            };
            Kind::ReduceMean {
                axes,
                keepdims: attr_i(n, "keepdims").unwrap_or(1) != 0,
            }
        }
        "Flatten" => Kind::Flatten {
            axis: attr_i(n, "axis").unwrap_or(1),
        },
        "Reshape" => Kind::Reshape {
            shape: const_ints(
                g,
                second.ok_or_else(|| HeadError("Reshape without shape".into()))?,
            )?,
        },
        "Squeeze" => Kind::Squeeze {
            axes: match (attr_ints(n, "axes"), second) {
                (Some(a), _) => Some(a),
                (None, Some(s)) => Some(const_ints(g, s)?),
                (None, None) => None,
            },
        },
        "Unsqueeze" => Kind::Unsqueeze {
            axes: match (attr_ints(n, "axes"), second) {
                (Some(a), _) => a,
                (None, Some(s)) => const_ints(g, s)?,
                (None, None) => return err("Unsqueeze without axes"),
            },
        },
        "Gemm" => {
            if attr_i(n, "transA").unwrap_or(0) != 0 {
                return err("Gemm with transA is not supported");
            }
            let b = const_array(constant(
                g,
                second.ok_or_else(|| HeadError("Gemm without B".into()))?,
            )?)?;
            let b = b
                .into_dimensionality::<Ix2>()
                .map_err(|e| HeadError(e.to_string()))?;
            let w = if attr_i(n, "transB").unwrap_or(0) != 0 {
                b.t().to_owned()
            } else {
                b
            };
            let bias = match n.input.get(2).filter(|s| !s.is_empty()) {
                Some(c) => Some(const_array(constant(g, c)?)?),
                None => None,
            };
            Kind::Linear {
                w,
                bias,
                alpha: attr_f(n, "alpha").unwrap_or(1.0),
                beta: attr_f(n, "beta").unwrap_or(1.0),
            }
        }
        "MatMul" => {
            let b = const_array(constant(
                g,
                second.ok_or_else(|| HeadError("MatMul without B".into()))?,
            )?)?;
            let w = b
                .into_dimensionality::<Ix2>()
                .map_err(|_| HeadError("MatMul weight must be 2-D".into()))?;
            Kind::Linear {
                w,
                bias: None,
                alpha: 1.0,
                beta: 0.0,
            }
        }
        "Add" | "Sub" | "Mul" | "Div" => return compile_binary(g, n),
        "Relu" => Kind::Relu,
        "Sigmoid" => Kind::Sigmoid,
        "Softmax" => Kind::Softmax {
            axis: attr_i(n, "axis").unwrap_or(if opset >= 13 { -1 } else { 1 }),
        },
        "Identity" | "Dropout" => Kind::Identity,
        "BatchNormalization" => {
            let get = |i: usize| -> Result<Vec<f32>, HeadError> {
                let name = n
                    .input
                    .get(i)
                    .ok_or_else(|| HeadError("BatchNormalization input missing".into()))?;
                tensor_f32(constant(g, name)?).map_err(|e| HeadError(e.to_string()))
            };
            let (scale, bias, mean, var) = (get(1)?, get(2)?, get(3)?, get(4)?);
            let eps = attr_f(n, "epsilon").unwrap_or(1e-5);
            let s: Vec<f32> = scale
                .iter()
                .zip(&var)
                .map(|(s, v)| s / (v + eps).sqrt())
                .collect();
            let shift = bias
                .iter()
                .zip(&mean)
                .zip(&s)
                .map(|((b, m), s)| b - m * s)
                .collect();
            Kind::ChannelAffine { scale: s, shift }
        }
        other => return err(format!("op {other} is not supported by exact Grad-CAM")),
    };
    Ok(Op { kind, x, y })
}

fn compile_binary(g: &OnnxGraph, n: &NodeProto) -> Result<Op, HeadError> {
    let y = n.output.first().cloned().unwrap_or_default();
    let (a, b) = match (n.input.first(), n.input.get(1)) {
        (Some(a), Some(b)) => (a, b),
        _ => return err(format!("{} needs two inputs", n.op_type)),
    };
    let (x, c, const_first) = match (g.constant(a), g.constant(b)) {
        (None, Some(c)) => (a.clone(), const_array(c)?, false),
        (Some(c), None) => (b.clone(), const_array(c)?, true),
        _ => return err(format!("{} of two activations is not supported", n.op_type)),
    };
    let kind = match (n.op_type.as_str(), const_first) {
        ("Add", _) => Kind::AddConst { c, x_sign: 1.0 },
        ("Sub", false) => Kind::AddConst { c: -c, x_sign: 1.0 },
        ("Sub", true) => Kind::AddConst { c, x_sign: -1.0 },
        ("Mul", _) => Kind::MulConst { c },
        ("Div", false) => Kind::MulConst {
            c: c.mapv(|v| 1.0 / v),
        },
        _ => return err("division by an activation is not supported"),
    };
    Ok(Op { kind, x, y })
}

fn axis_index(axis: i64, rank: usize) -> Result<usize, HeadError> {
    let a = if axis < 0 { axis + rank as i64 } else { axis };
    if a < 0 || a as usize >= rank {
        return err(format!("axis {axis} out of range for rank {rank}"));
    }
    Ok(a as usize)
}

fn reshape(x: &ArrayD<f32>, shape: &[usize]) -> Result<ArrayD<f32>, HeadError> {
    x.as_standard_layout()
        .into_owned()
        .into_shape_with_order(IxDyn(shape))
        .map_err(|e| HeadError(e.to_string()))
}

fn broadcast_to(c: &ArrayD<f32>, shape: &[usize]) -> Result<ArrayD<f32>, HeadError> {
    c.broadcast(IxDyn(shape))
        .map(|v| v.to_owned())
        .ok_or_else(|| {
            HeadError(format!(
                "constant {:?} does not broadcast to {shape:?}",
                c.shape()
            ))
        })
}

fn reshape_target(kind: &Kind, x: &ArrayD<f32>) -> Result<Vec<usize>, HeadError> {
    let s = x.shape();
    Ok(match kind {
        Kind::Flatten { axis } => {
            let a = if *axis < 0 {
                (*axis + s.len() as i64) as usize
            } else {
                *axis as usize
            };
            vec![s[..a].iter().product(), s[a..].iter().product()]
        }
        Kind::Reshape { shape } => {
            let mut out: Vec<i64> = shape
                .iter()
                .enumerate()
                .map(|(i, &d)| if d == 0 { s[i] as i64 } else { d })
                .collect();
            let known: i64 = out.iter().filter(|&&d| d > 0).product();
            if let Some(p) = out.iter().position(|&d| d == -1) {
                out[p] = x.len() as i64 / known.max(1);
            }
            out.iter().map(|&d| d as usize).collect()
        }
        Kind::Squeeze { axes } => {
            let drop: Vec<usize> = match axes {
                Some(a) => a
                    .iter()
                    .map(|&v| axis_index(v, s.len()))
                    .collect::<Result<_, _>>()?,
                None => (0..s.len()).filter(|&i| s[i] == 1).collect(),
            };
            s.iter()
                .enumerate()
                .filter(|(i, _)| !drop.contains(i))
                .map(|(_, &d)| d)
                .collect()
        }
        Kind::Unsqueeze { axes } => {
            let rank = s.len() + axes.len();
            let ins: Vec<usize> = axes
                .iter()
                .map(|&v| axis_index(v, rank))
                .collect::<Result<_, _>>()?;
            let mut it = s.iter();
            (0..rank)
                .map(|i| {
                    if ins.contains(&i) {
                        1
                    } else {
                        *it.next().unwrap_or(&1)
                    }
                })
                .collect()
        }
        _ => s.to_vec(),
    })
}

fn forward_op(kind: &Kind, x: &ArrayD<f32>) -> Result<ArrayD<f32>, HeadError> {
    Ok(match kind {
        Kind::GlobalAvgPool => {
            if x.ndim() != 4 {
                return err("GlobalAveragePool needs a 4-D input");
            }
            let (n, c) = (x.shape()[0], x.shape()[1]);
            let m = x.mean_axis(Axis(3)).and_then(|v| v.mean_axis(Axis(2)));
            reshape(
                &m.ok_or_else(|| HeadError("empty feature map".into()))?,
                &[n, c, 1, 1],
            )?
        }
        Kind::ReduceMean { axes, keepdims } => {
            let mut ax: Vec<usize> = axes
                .iter()
                .map(|&a| axis_index(a, x.ndim()))
                .collect::<Result<_, _>>()?;
            ax.sort_unstable();
            let mut v = x.clone();
            for &a in ax.iter().rev() {
                v = v
                    .mean_axis(Axis(a))
                    .ok_or_else(|| HeadError("empty axis".into()))?;
            }
            if *keepdims {
                let shape: Vec<usize> = (0..x.ndim())
                    .map(|i| if ax.contains(&i) { 1 } else { x.shape()[i] })
                    .collect();
                v = reshape(&v, &shape)?;
            }
            v
        }
        Kind::Flatten { .. }
        | Kind::Reshape { .. }
        | Kind::Squeeze { .. }
        | Kind::Unsqueeze { .. } => reshape(x, &reshape_target(kind, x)?)?,
        Kind::Linear {
            w,
            bias,
            alpha,
            beta,
        } => {
            let x2 = x
                .view()
                .into_dimensionality::<Ix2>()
                .map_err(|_| HeadError("Gemm/MatMul input must be 2-D".into()))?;
            if x2.shape()[1] != w.shape()[0] {
                return err(format!("Gemm/MatMul: {:?} x {:?}", x2.shape(), w.shape()));
            }
            let mut y = x2.dot(w) * *alpha;
            if let Some(b) = bias {
                let shape = y.shape().to_vec();
                y = y + broadcast_to(b, &shape)?
                    .into_dimensionality::<Ix2>()
                    .map_err(|e| HeadError(e.to_string()))?
                    * *beta;
            }
            y.into_dyn()
        }
        Kind::AddConst { c, x_sign } => x * *x_sign + broadcast_to(c, x.shape())?,
        Kind::MulConst { c } => x * &broadcast_to(c, x.shape())?,
        Kind::Relu => x.mapv(|v| v.max(0.0)),
        Kind::Sigmoid => x.mapv(|v| 1.0 / (1.0 + (-v).exp())),
        Kind::Softmax { axis } => {
            let a = Axis(axis_index(*axis, x.ndim())?);
            let mut y = x.clone();
            for mut lane in y.lanes_mut(a) {
                let m = lane.fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                lane.mapv_inplace(|v| (v - m).exp());
                let s = lane.sum();
                lane.mapv_inplace(|v| v / s);
            }
            y
        }
        Kind::ChannelAffine { scale, shift } => {
            let mut y = x.clone();
            if x.ndim() < 2 || x.shape()[1] != scale.len() {
                return err("BatchNormalization channel count mismatch");
            }
            for (c, mut sub) in y.axis_iter_mut(Axis(1)).enumerate() {
                sub.mapv_inplace(|v| v * scale[c] + shift[c]);
            }
            y
        }
        Kind::Identity => x.clone(),
    })
}

fn backward_op(
    kind: &Kind,
    x: &ArrayD<f32>,
    y: &ArrayD<f32>,
    gy: ArrayD<f32>,
) -> Result<ArrayD<f32>, HeadError> {
    Ok(match kind {
        Kind::GlobalAvgPool => {
            let hw = (x.shape()[2] * x.shape()[3]) as f32;
            broadcast_to(&gy, x.shape())? / hw
        }
        Kind::ReduceMean { axes, .. } => {
            let ax: Vec<usize> = axes
                .iter()
                .map(|&a| axis_index(a, x.ndim()))
                .collect::<Result<_, _>>()?;
            let count: usize = ax.iter().map(|&a| x.shape()[a]).product();
            let kept: Vec<usize> = (0..x.ndim())
                .map(|i| if ax.contains(&i) { 1 } else { x.shape()[i] })
                .collect();
            broadcast_to(&reshape(&gy, &kept)?, x.shape())? / count as f32
        }
        Kind::Flatten { .. }
        | Kind::Reshape { .. }
        | Kind::Squeeze { .. }
        | Kind::Unsqueeze { .. } => reshape(&gy, x.shape())?,
        Kind::Linear { w, alpha, .. } => {
            let g2 = gy
                .into_dimensionality::<Ix2>()
                .map_err(|e| HeadError(e.to_string()))?;
            (g2.dot(&w.t()) * *alpha).into_dyn()
        }
        Kind::AddConst { x_sign, .. } => {
            if gy.shape() != x.shape() {
                return err("Add/Sub broadcasts the activation");
            }
            gy * *x_sign
        }
        Kind::MulConst { c } => {
            if gy.shape() != x.shape() {
                return err("Mul/Div broadcasts the activation");
            }
            gy * &broadcast_to(c, x.shape())?
        }
        Kind::Relu => {
            let mut g = gy;
            g.zip_mut_with(x, |g, &v| {
                if v <= 0.0 {
                    *g = 0.0
                }
            });
            g
        }
        Kind::Sigmoid => {
            let mut g = gy;
            g.zip_mut_with(y, |g, &s| *g *= s * (1.0 - s));
            g
        }
        Kind::Softmax { axis } => {
            let a = Axis(axis_index(*axis, y.ndim())?);
            let dot = (&gy * y).sum_axis(a).insert_axis(a);
            (gy - &broadcast_to(&dot, y.shape())?) * y
        }
        Kind::ChannelAffine { scale, .. } => {
            let mut g = gy;
            for (c, mut sub) in g.axis_iter_mut(Axis(1)).enumerate() {
                sub.mapv_inplace(|v| v * scale[c]);
            }
            g
        }
        Kind::Identity => gy,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    fn op(kind: Kind, x: &str, y: &str) -> Op {
        Op {
            kind,
            x: x.into(),
            y: y.into(),
        }
    }

    /// Finite differences agree with the reverse-mode gradient through GAP, Linear, ReLU,
    /// BatchNorm and a second Linear.
    #[test]
    fn gradient_matches_finite_differences() {
        let w1 = array![[0.5f32, -1.0, 0.3], [0.2, 0.4, -0.7]];
        let w2 = array![[1.0f32, -0.5], [0.3, 0.8], [-0.6, 0.2]];
        let head = Head {
            ops: vec![
                op(Kind::GlobalAvgPool, "a", "p"),
                op(Kind::Flatten { axis: 1 }, "p", "f"),
                op(
                    Kind::Linear {
                        w: w1,
                        bias: Some(array![0.1f32, -0.2, 0.05].into_dyn()),
                        alpha: 1.0,
                        beta: 1.0,
                    },
                    "f",
                    "h",
                ),
                op(
                    Kind::ChannelAffine {
                        scale: vec![1.5, 0.5, 2.0],
                        shift: vec![0.0, 0.1, -0.1],
                    },
                    "h",
                    "b",
                ),
                op(Kind::Relu, "b", "r"),
                op(
                    Kind::Linear {
                        w: w2,
                        bias: None,
                        alpha: 1.0,
                        beta: 0.0,
                    },
                    "r",
                    "s",
                ),
            ],
            target: "a".into(),
            score: "s".into(),
        };
        let a = ArrayD::from_shape_fn(IxDyn(&[1, 2, 3, 3]), |d| {
            ((d[1] * 9 + d[2] * 3 + d[3]) as f32 * 0.37).sin()
        });
        for class in 0..2 {
            let values = head.forward(a.clone()).unwrap();
            let g = head.gradient(&values, class).unwrap();
            for idx in [[0, 0, 0, 0], [0, 1, 2, 1], [0, 0, 1, 2]] {
                let eps = 1e-2;
                let mut ap = a.clone();
                ap[IxDyn(&idx)] += eps;
                let mut am = a.clone();
                am[IxDyn(&idx)] -= eps;
                let fp = head.forward(ap).unwrap()["s"][[0, class]];
                let fm = head.forward(am).unwrap()["s"][[0, class]];
                let fd = (fp - fm) / (2.0 * eps);
                assert!(
                    (fd - g[IxDyn(&idx)]).abs() < 1e-3,
                    "class {class} {idx:?}: fd {fd} vs {}",
                    g[IxDyn(&idx)]
                );
            }
        }
    }

    #[test]
    fn softmax_gradient_matches_finite_differences() {
        let head = Head {
            ops: vec![op(Kind::Softmax { axis: -1 }, "a", "s")],
            target: "a".into(),
            score: "s".into(),
        };
        let a = array![[0.3f32, -1.2, 2.0]].into_dyn();
        let g = head.gradient(&head.forward(a.clone()).unwrap(), 2).unwrap();
        for j in 0..3 {
            let mut ap = a.clone();
            ap[[0, j]] += 1e-3;
            let mut am = a.clone();
            am[[0, j]] -= 1e-3;
            let fd = (head.forward(ap).unwrap()["s"][[0, 2]]
                - head.forward(am).unwrap()["s"][[0, 2]])
                / 2e-3;
            assert!((fd - g[[0, j]]).abs() < 1e-3);
        }
    }
}

//! The CPU backend's f32 tensors read and written in place, for the operations that
//! run their own parallel passes there ([`crate::loss`], [`crate::gelu`],
//! [`crate::norm`], [`crate::adamw`]).

use burn::backend::ndarray::NdArrayTensor;
use ndarray::{ArrayD, ArrayViewD, IxDyn};

/// A view of `t` when it is f32 in standard (row-major, contiguous) layout.
pub(crate) fn f32_view(t: &NdArrayTensor) -> Option<ArrayViewD<'_, f32>> {
    match t {
        NdArrayTensor::F32(storage) => {
            let view = storage.view();
            view.is_standard_layout().then_some(view)
        }
        _ => None,
    }
}

/// A tensor of `shape` holding `values`.
pub(crate) fn tensor(values: Vec<f32>, shape: &[usize]) -> NdArrayTensor {
    let array = ArrayD::from_shape_vec(IxDyn(shape), values).expect("shape of the values");
    NdArrayTensor::from(array.into_shared())
}

/// A CPU tensor's values, for tests.
#[cfg(test)]
pub(crate) fn values<const D: usize>(
    t: burn::tensor::Tensor<burn::backend::NdArray<f32>, D>,
) -> Vec<f32> {
    t.into_data().into_vec().unwrap()
}

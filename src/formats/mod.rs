//! The files exchanged with PyTorch: model weights recognised by content, torch.save pickles
//! both ways, torch.export archives, ONNX, training checkpoints, the model card, and the export.

pub mod card;
pub mod export;
pub mod onnx;
pub mod pt2;
pub mod torch_checkpoint;
pub mod torch_pickle;
pub mod weights;

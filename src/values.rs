//! A contiguous CPU tensor's values as a Rust slice, borrowed in place: the direct engine's
//! loops, the flat optimizer and the data path read (and write) libtorch's memory without
//! copying it out and back.

use tch::kind::Element;
use tch::{Device, Tensor};

/// The values of `t`, which must be a contiguous CPU tensor of `T`'s kind.
pub fn of<T: Element>(t: &Tensor) -> &[T] {
    check::<T>(t);
    if t.numel() == 0 {
        return &[]; // whose data pointer may be null
    }
    // SAFETY: such a tensor holds `numel` initialised values of `T` from its data pointer,
    // and the borrow of `t` keeps its storage alive meanwhile.
    unsafe { std::slice::from_raw_parts(t.data_ptr() as *const T, t.numel()) }
}

/// The values of `t` to write in place, as [`of`]. The exclusive borrow covers this handle
/// only: the caller reads no other view of the same storage while it holds the slice.
pub fn of_mut<T: Element>(t: &mut Tensor) -> &mut [T] {
    check::<T>(t);
    if t.numel() == 0 {
        return &mut [];
    }
    // SAFETY: as in `of`, and the caller keeps other views of the storage unread meanwhile.
    unsafe { std::slice::from_raw_parts_mut(t.data_ptr() as *mut T, t.numel()) }
}

fn check<T: Element>(t: &Tensor) {
    assert!(
        t.kind() == T::KIND && t.device() == Device::Cpu && t.is_contiguous(),
        "a contiguous CPU tensor of {:?}, not {:?} on {:?}",
        T::KIND,
        t.kind(),
        t.device()
    );
}

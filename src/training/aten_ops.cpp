// The ATen calls torch.optim makes that tch 0.24 does not bind: `add`/`add_` with `alpha`,
// `addcmul_`/`addcdiv_` with `value`, and setting a gradient to None. tch's wrappers drop
// these scalars, and folding them into another operand is not the same arithmetic: `add`
// with `alpha` is one fused multiply-add per element in ATen's vectorised CPU kernel.
// Called from src/optim.rs; a tch `C_tensor` is a `torch::Tensor*` (torch-sys's torch_api.h).
#include <ATen/ATen.h>
#include <cstdlib>
#include <cstring>
#include <exception>

namespace {
// An error as a malloc'd C string for Rust to read and free; nullptr means success.
template <typename F> char* guarded(F f) {
  try {
    f();
    return nullptr;
  } catch (const std::exception& e) {
    return strdup(e.what());
  }
}
}  // namespace

extern "C" {
char* lenet5_add_(at::Tensor* self, const at::Tensor* other, double alpha) {
  return guarded([&] { self->add_(*other, alpha); });
}
char* lenet5_add(at::Tensor** out, const at::Tensor* self, const at::Tensor* other, double alpha) {
  return guarded([&] { *out = new at::Tensor(self->add(*other, alpha)); });
}
char* lenet5_addcmul_(at::Tensor* self, const at::Tensor* t1, const at::Tensor* t2, double value) {
  return guarded([&] { self->addcmul_(*t1, *t2, value); });
}
char* lenet5_addcdiv_(at::Tensor* self, const at::Tensor* t1, const at::Tensor* t2, double value) {
  return guarded([&] { self->addcdiv_(*t1, *t2, value); });
}
// What `optimizer.zero_grad()` does by default (set_to_none=True).
char* lenet5_clear_grad(at::Tensor* self) {
  return guarded([&] { self->mutable_grad().reset(); });
}
void lenet5_free_error(char* error) { free(error); }
}

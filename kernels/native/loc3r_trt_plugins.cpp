// TensorRT IPluginV3 plugins over the loc3r AOT kernels (built by CMakeLists.txt when
// NvInfer.h is found, e.g. on JetPack 6/7 with TensorRT 10).
//
// - "FusedAttention" v1, namespace "loc3r": the node loc3r::FusedAttention from the ONNX export
//   (kernels/onnx_symbolic.py). Inputs q (B,H,T,D) fp16, k_cache, v_cache (B,KVH,S,D) fp16,
//   prefix_lens (B,) int32; attributes scale (float), causal (int); output (B,H,T,D) fp16.
// - "MatMulNBits" v1, default namespace: com.microsoft::MatMulNBits (bits=4) from the int4 export, so the
//   same initializers serve onnxruntime and TensorRT. Inputs A (..., K) fp16, B uint8
//   (N, n_blocks, block_size/2), scales fp16, optional zero_points uint8; attributes K, N,
//   bits, block_size; output (..., N) fp16.
//
// TensorRT's ONNX parser finds a creator by the node's op_type and version "1"; load this
// library with trtexec --dynamicPlugins=libloc3r_trt_plugin.so or
// IPluginRegistry::loadLibrary(). Both plugins run on the stream TensorRT passes.
#include <NvInferRuntime.h>

#include <cstring>
#include <string>
#include <vector>

#include "loc3r_kernels.h"

using namespace nvinfer1;

namespace {

constexpr char const* kVersion = "1";
// FusedAttention nodes carry plugin_namespace="loc3r"; MatMulNBits nodes (also written by
// onnxruntime's quantizer) carry none, so that creator lives in the default namespace.
constexpr char const* kAttentionNamespace = "loc3r";
constexpr char const* kDefaultNamespace = "";

int64_t volume_except_last(Dims const& d) {
  int64_t v = 1;
  for (int32_t i = 0; i + 1 < d.nbDims; ++i) v *= d.d[i];
  return v;
}

// Reads one scalar attribute of the given type from a field collection, if present.
template <typename T>
void read_field(PluginFieldCollection const* fc, char const* name, PluginFieldType type, T& out) {
  if (!fc) return;
  for (int32_t i = 0; i < fc->nbFields; ++i) {
    PluginField const& f = fc->fields[i];
    if (f.name && std::strcmp(f.name, name) == 0 && f.type == type && f.data && f.length >= 1)
      out = *static_cast<T const*>(f.data);
  }
}

// Shared IPluginV3 plumbing: one object provides the core, build and runtime capabilities.
class Loc3rPluginBase : public IPluginV3, public IPluginV3OneCore, public IPluginV3OneBuild, public IPluginV3OneRuntime {
 public:
  IPluginCapability* getCapabilityInterface(PluginCapabilityType type) noexcept override {
    switch (type) {
      case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
      case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
      case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
    }
    return nullptr;
  }
  char const* getPluginVersion() const noexcept override { return kVersion; }
  int32_t getNbOutputs() const noexcept override { return 1; }
  int32_t configurePlugin(DynamicPluginTensorDesc const*, int32_t, DynamicPluginTensorDesc const*, int32_t) noexcept override {
    return 0;
  }
  int32_t onShapeChange(PluginTensorDesc const*, int32_t, PluginTensorDesc const*, int32_t) noexcept override { return 0; }
  IPluginV3* attachToContext(IPluginResourceContext*) noexcept override { return clone(); }
};

// --- FusedAttention ------------------------------------------------------------------------

class FusedAttentionPlugin final : public Loc3rPluginBase {
 public:
  FusedAttentionPlugin(float scale, int32_t causal) : scale_(scale), causal_(causal) {
    fields_[0] = PluginField("scale", &scale_, PluginFieldType::kFLOAT32, 1);
    fields_[1] = PluginField("causal", &causal_, PluginFieldType::kINT32, 1);
    collection_.nbFields = 2;
    collection_.fields = fields_;
  }
  IPluginV3* clone() noexcept override { return new FusedAttentionPlugin(scale_, causal_); }
  char const* getPluginName() const noexcept override { return "FusedAttention"; }
  char const* getPluginNamespace() const noexcept override { return kAttentionNamespace; }

  int32_t getOutputDataTypes(DataType* out, int32_t nbOutputs, DataType const* in, int32_t nbInputs) const noexcept override {
    if (nbOutputs != 1 || nbInputs != 4) return 1;
    out[0] = in[0];
    return 0;
  }
  int32_t getOutputShapes(DimsExprs const* in, int32_t nbInputs, DimsExprs const*, int32_t, DimsExprs* out, int32_t nbOutputs,
                          IExprBuilder&) noexcept override {
    if (nbInputs != 4 || nbOutputs != 1 || in[0].nbDims != 4) return 1;
    out[0] = in[0];  // (B, H, T, D)
    return 0;
  }
  bool supportsFormatCombination(int32_t pos, DynamicPluginTensorDesc const* io, int32_t nbInputs, int32_t nbOutputs) noexcept override {
    if (nbInputs != 4 || nbOutputs != 1) return false;
    PluginTensorDesc const& d = io[pos].desc;
    if (d.format != TensorFormat::kLINEAR) return false;
    return pos == 3 ? d.type == DataType::kINT32 : d.type == DataType::kHALF;
  }
  size_t getWorkspaceSize(DynamicPluginTensorDesc const* in, int32_t, DynamicPluginTensorDesc const*, int32_t) const noexcept override {
    Loc3rAttentionShape s = shape(in[0].max, in[1].max);
    s.q_len = 1;  // the decode path is the only one needing scratch; size it for the largest cache
    return loc3r_attention_workspace_size(&s);
  }
  int32_t enqueue(PluginTensorDesc const* in, PluginTensorDesc const*, void const* const* inputs, void* const* outputs,
                  void* workspace, cudaStream_t stream) noexcept override {
    Loc3rAttentionShape s = shape(in[0].dims, in[1].dims);
    CUresult rc = loc3r_attention_fp16(reinterpret_cast<CUstream>(stream), &s, ptr(inputs[0]), ptr(inputs[1]),
                                       ptr(inputs[2]), ptr(inputs[3]), ptr(outputs[0]), ptr(workspace));
    return rc == CUDA_SUCCESS ? 0 : static_cast<int32_t>(rc);
  }
  PluginFieldCollection const* getFieldsToSerialize() noexcept override { return &collection_; }

 private:
  static CUdeviceptr ptr(void const* p) { return reinterpret_cast<CUdeviceptr>(p); }
  Loc3rAttentionShape shape(Dims const& q, Dims const& k) const {
    Loc3rAttentionShape s{};
    s.batch = static_cast<int>(q.d[0]);
    s.num_heads = static_cast<int>(q.d[1]);
    s.q_len = static_cast<int>(q.d[2]);
    s.head_dim = static_cast<int>(q.d[3]);
    s.num_kv_heads = static_cast<int>(k.d[1]);
    s.cache_len = static_cast<int>(k.d[2]);
    s.scale = scale_;
    s.causal = causal_;
    return s;
  }
  float scale_;
  int32_t causal_;
  PluginField fields_[2];
  PluginFieldCollection collection_{};
};

// --- MatMulNBits (W4A16) ---------------------------------------------------------------------

class MatMulNBitsPlugin final : public Loc3rPluginBase {
 public:
  MatMulNBitsPlugin(int32_t k, int32_t n, int32_t bits, int32_t block_size)
      : k_(k), n_(n), bits_(bits), block_size_(block_size) {
    fields_[0] = PluginField("K", &k_, PluginFieldType::kINT32, 1);
    fields_[1] = PluginField("N", &n_, PluginFieldType::kINT32, 1);
    fields_[2] = PluginField("bits", &bits_, PluginFieldType::kINT32, 1);
    fields_[3] = PluginField("block_size", &block_size_, PluginFieldType::kINT32, 1);
    collection_.nbFields = 4;
    collection_.fields = fields_;
  }
  bool valid() const { return bits_ == 4 && k_ > 0 && n_ > 0 && (block_size_ == 32 || block_size_ == 128); }
  IPluginV3* clone() noexcept override { return new MatMulNBitsPlugin(k_, n_, bits_, block_size_); }
  char const* getPluginName() const noexcept override { return "MatMulNBits"; }
  char const* getPluginNamespace() const noexcept override { return kDefaultNamespace; }

  int32_t getOutputDataTypes(DataType* out, int32_t nbOutputs, DataType const* in, int32_t nbInputs) const noexcept override {
    if (nbOutputs != 1 || nbInputs < 3) return 1;
    out[0] = in[0];
    return 0;
  }
  int32_t getOutputShapes(DimsExprs const* in, int32_t nbInputs, DimsExprs const*, int32_t, DimsExprs* out, int32_t nbOutputs,
                          IExprBuilder& builder) noexcept override {
    if (nbInputs < 3 || nbOutputs != 1 || in[0].nbDims < 1) return 1;
    out[0] = in[0];
    out[0].d[in[0].nbDims - 1] = builder.constant(n_);  // (..., K) -> (..., N)
    return 0;
  }
  bool supportsFormatCombination(int32_t pos, DynamicPluginTensorDesc const* io, int32_t nbInputs, int32_t nbOutputs) noexcept override {
    if (nbInputs < 3 || nbInputs > 4 || nbOutputs != 1) return false;
    PluginTensorDesc const& d = io[pos].desc;
    if (d.format != TensorFormat::kLINEAR) return false;
    bool packed_bytes = (pos == 1 || (pos == 3 && nbInputs == 4));
    if (packed_bytes) return d.type == DataType::kUINT8 || d.type == DataType::kINT8;
    return d.type == DataType::kHALF;  // A, scales, output
  }
  int32_t enqueue(PluginTensorDesc const* in, PluginTensorDesc const*, void const* const* inputs, void* const* outputs, void*,
                  cudaStream_t stream) noexcept override {
    if (!valid()) return 1;
    Loc3rW4A16Shape s{};
    s.m = static_cast<int>(volume_except_last(in[0].dims));
    s.n = n_;
    s.k = k_;
    s.block_size = block_size_;
    s.has_zero_points = has_zero_points_ ? 1 : 0;
    CUdeviceptr zp = has_zero_points_ ? reinterpret_cast<CUdeviceptr>(inputs[3]) : 0;
    CUresult rc = loc3r_w4a16_matmul_fp16(reinterpret_cast<CUstream>(stream), &s, reinterpret_cast<CUdeviceptr>(inputs[0]),
                                          reinterpret_cast<CUdeviceptr>(inputs[1]), reinterpret_cast<CUdeviceptr>(inputs[2]),
                                          zp, reinterpret_cast<CUdeviceptr>(outputs[0]));
    return rc == CUDA_SUCCESS ? 0 : static_cast<int32_t>(rc);
  }
  int32_t configurePlugin(DynamicPluginTensorDesc const*, int32_t nbInputs, DynamicPluginTensorDesc const*, int32_t) noexcept override {
    has_zero_points_ = nbInputs == 4;
    return valid() ? 0 : 1;
  }
  int32_t onShapeChange(PluginTensorDesc const*, int32_t nbInputs, PluginTensorDesc const*, int32_t) noexcept override {
    has_zero_points_ = nbInputs == 4;
    return valid() ? 0 : 1;
  }
  PluginFieldCollection const* getFieldsToSerialize() noexcept override { return &collection_; }

 private:
  int32_t k_, n_, bits_, block_size_;
  bool has_zero_points_ = true;
  PluginField fields_[4];
  PluginFieldCollection collection_{};
};

// --- Creators ----------------------------------------------------------------------------------

class CreatorBase : public IPluginCreatorV3One {
 public:
  char const* getPluginVersion() const noexcept override { return kVersion; }
  PluginFieldCollection const* getFieldNames() noexcept override { return &collection_; }

 protected:
  void declare(std::vector<PluginField> fields) {
    fields_ = std::move(fields);
    collection_.nbFields = static_cast<int32_t>(fields_.size());
    collection_.fields = fields_.data();
  }

 private:
  std::vector<PluginField> fields_;
  PluginFieldCollection collection_{};
};

class FusedAttentionCreator final : public CreatorBase {
 public:
  FusedAttentionCreator() {
    declare({PluginField("scale", nullptr, PluginFieldType::kFLOAT32, 1),
             PluginField("causal", nullptr, PluginFieldType::kINT32, 1)});
  }
  char const* getPluginName() const noexcept override { return "FusedAttention"; }
  char const* getPluginNamespace() const noexcept override { return kAttentionNamespace; }
  IPluginV3* createPlugin(char const*, PluginFieldCollection const* fc, TensorRTPhase) noexcept override {
    float scale = 0.F;
    int32_t causal = 1;
    read_field(fc, "scale", PluginFieldType::kFLOAT32, scale);
    read_field(fc, "causal", PluginFieldType::kINT32, causal);
    if (!(scale > 0.F)) return nullptr;  // the exporter always writes the scale
    return new FusedAttentionPlugin(scale, causal);
  }
};

class MatMulNBitsCreator final : public CreatorBase {
 public:
  MatMulNBitsCreator() {
    declare({PluginField("K", nullptr, PluginFieldType::kINT32, 1), PluginField("N", nullptr, PluginFieldType::kINT32, 1),
             PluginField("bits", nullptr, PluginFieldType::kINT32, 1),
             PluginField("block_size", nullptr, PluginFieldType::kINT32, 1)});
  }
  char const* getPluginName() const noexcept override { return "MatMulNBits"; }
  char const* getPluginNamespace() const noexcept override { return kDefaultNamespace; }
  IPluginV3* createPlugin(char const*, PluginFieldCollection const* fc, TensorRTPhase) noexcept override {
    int32_t k = 0, n = 0, bits = 4, block_size = 32;
    read_field(fc, "K", PluginFieldType::kINT32, k);
    read_field(fc, "N", PluginFieldType::kINT32, n);
    read_field(fc, "bits", PluginFieldType::kINT32, bits);
    read_field(fc, "block_size", PluginFieldType::kINT32, block_size);
    auto* plugin = new MatMulNBitsPlugin(k, n, bits, block_size);
    if (!plugin->valid()) {
      delete plugin;
      return nullptr;
    }
    return plugin;
  }
};

}  // namespace

// Entry points TensorRT looks up in a plugin library (IPluginRegistry::loadLibrary, trtexec --dynamicPlugins).
extern "C" __attribute__((visibility("default"))) void setLoggerFinder(ILoggerFinder*) {}

extern "C" __attribute__((visibility("default"))) IPluginCreatorInterface* const* getCreators(int32_t& nbCreators) {
  static FusedAttentionCreator attention;
  static MatMulNBitsCreator matmul;
  static IPluginCreatorInterface* const creators[] = {&attention, &matmul};
  nbCreators = 2;
  return creators;
}

// PyTorch-compatible tensor printing. The layout rules follow torch/_tensor_str.py so that printouts can
// be compared with PyTorch's side by side:
//   - one formatter for the whole tensor (from the elements that are shown), giving every element the same
//     width: integers as-is; floats in "int mode" ("3.") when all finite values are whole, else fixed
//     ("%.4f"), switching to scientific ("%.4e") when max/min > 1000, max > 1e8, or (non-int) min < 1e-4;
//   - more than `threshold` elements: each dim shows its first and last `edgeitems` entries around "...";
//   - a 1-D row wraps after floor((linewidth - indent) / (width + 2)) elements;
//   - suffixes: device (non-CPU), dtype (when not float32/int64/bool), grad_fn or requires_grad, moved
//     to a new line when they would pass linewidth.
// Elements are read one at a time through the device backend, so any device and layout prints without ops.
#include "flexgrad/tensor/print.h"

#include <cmath>
#include <cstring>

namespace fg {
namespace {

PrintOptions& options_storage() {
  static PrintOptions opts;
  return opts;
}

// One element: floats as double, integers exactly as int64 (a double would round past 2^53).
struct Elem {
  double f = 0;
  int64_t i = 0;
};

// Reads elements of a tensor at storage offsets, on any device.
class ElementReader {
 public:
  explicit ElementReader(const Tensor& t) : t_(t), es_(t.element_size()) {}
  Elem operator()(int64_t offset) const {
    alignas(8) unsigned char buf[8];
    const char* src = static_cast<const char*>(t_.storage()->data()) + offset * static_cast<int64_t>(es_);
    if (t_.is_cpu()) std::memcpy(buf, src, es_);
    else device_backend(t_.device()).copy_bytes(buf, kCPU, src, t_.device(), es_);
    return FG_DISPATCH_ALL_TYPES(t_.dtype(), "print", [&]<class T>() {
      T v;
      std::memcpy(&v, buf, sizeof(T));
      if constexpr (std::is_integral_v<T>) return Elem{static_cast<double>(v), static_cast<int64_t>(v)};
      else return Elem{static_cast<double>(static_cast<compute_t<T>>(v)), 0};
    });
  }

 private:
  const Tensor& t_;
  size_t es_;
};

// Indices shown along a dim of `size`; -1 marks the "..." between the two edges.
std::vector<int64_t> shown_indices(int64_t size, bool summarize, int64_t edge) {
  std::vector<int64_t> out;
  if (summarize && size > 2 * edge) {
    for (int64_t i = 0; i < edge; ++i) out.push_back(i);
    out.push_back(-1);
    for (int64_t i = size - edge; i < size; ++i) out.push_back(i);
  } else {
    for (int64_t i = 0; i < size; ++i) out.push_back(i);
  }
  return out;
}

// Calls f(value) for every shown element in print order.
template <class F>
void for_each_shown(const Tensor& t, const ElementReader& read, bool summarize, int64_t edge, int64_t d,
                    int64_t offset, F&& f) {
  if (d == t.dim()) { f(read(offset)); return; }
  for (int64_t i : shown_indices(t.sizes()[d], summarize, edge)) {
    if (i >= 0) for_each_shown(t, read, summarize, edge, d + 1, offset + i * t.strides()[d], f);
  }
}

std::string format_fixed(double v, int precision) {
  if (std::isnan(v)) return "nan";
  return fmt::format("{:.{}f}", v, precision);
}
std::string format_sci(double v, int precision) {
  if (std::isnan(v)) return "nan";
  return fmt::format("{:.{}e}", v, precision);
}

// One width and one notation for every element of a tensor (torch's _Formatter).
class Formatter {
 public:
  Formatter(DType dtype, const std::vector<Elem>& values, int precision)
      : floating_(is_floating(dtype)), is_bool_(dtype == kBool), precision_(precision) {
    if (!floating_) {
      for (const Elem& v : values) width_ = std::max(width_, format_value(v).size());
      return;
    }
    std::vector<double> nz;  // nonzero finite values decide the notation
    for (const Elem& e : values) if (std::isfinite(e.f) && e.f != 0) nz.push_back(e.f);
    if (nz.empty()) return;
    double amin = INFINITY, amax = 0;
    for (double v : nz) { amin = std::min(amin, std::abs(v)); amax = std::max(amax, std::abs(v)); }
    for (double v : nz) if (v != std::ceil(v)) { int_mode_ = false; break; }
    if (int_mode_) {
      sci_ = amax / amin > 1000.0 || amax > 1.0e8;
      for (double v : nz) {
        width_ = std::max(width_, sci_ ? format_sci(v, precision_).size() : format_fixed(v, 0).size() + 1);
      }
    } else {
      sci_ = amax / amin > 1000.0 || amax > 1.0e8 || amin < 1.0e-4;
      for (double v : nz) {
        width_ = std::max(width_, sci_ ? format_sci(v, precision_).size() : format_fixed(v, precision_).size());
      }
    }
  }

  size_t width() const { return width_; }

  std::string format(const Elem& v) const {
    std::string s = format_value(v);
    return std::string(width_ > s.size() ? width_ - s.size() : 0, ' ') + s;
  }

 private:
  std::string format_value(const Elem& e) const {
    if (!floating_) {
      if (is_bool_) return e.i != 0 ? "True" : "False";
      return fmt::format("{}", e.i);
    }
    double v = e.f;
    if (sci_) return format_sci(v, precision_);
    if (int_mode_) {
      std::string s = format_fixed(v, 0);
      if (std::isfinite(v)) s += '.';  // mark the value as floating
      return s;
    }
    return format_fixed(v, precision_);
  }

  bool floating_, is_bool_;
  int precision_;
  bool int_mode_ = true, sci_ = false;
  size_t width_ = 1;
};

struct Printer {
  const Tensor& t;
  const ElementReader& read;
  const Formatter& fmt;
  const PrintOptions& opts;
  bool summarize;

  std::string vector_str(int64_t offset, int64_t indent) const {
    int64_t d = t.dim() - 1;
    int64_t element_length = static_cast<int64_t>(fmt.width()) + 2;  // ", " between elements
    int64_t per_line = std::max<int64_t>(1, (opts.linewidth - indent) / element_length);
    std::vector<std::string> items;
    if (summarize && opts.edgeitems == 0) {
      items.push_back("...");
    } else {
      for (int64_t i : shown_indices(t.sizes()[d], summarize, opts.edgeitems)) {
        items.push_back(i < 0 ? " ..." : fmt.format(read(offset + i * t.strides()[d])));
      }
    }
    std::string out = "[";
    for (size_t k = 0; k < items.size(); ++k) {
      if (k > 0) out += static_cast<int64_t>(k) % per_line == 0 ? ",\n" + std::string(indent + 1, ' ') : ", ";
      out += items[k];
    }
    return out + "]";
  }

  std::string str(int64_t d, int64_t offset, int64_t indent) const {
    if (t.dim() == 0) return fmt.format(read(offset));
    if (d == t.dim() - 1) return vector_str(offset, indent);
    // Slices are separated by as many newlines as dims remain below this one.
    std::string sep(1, ',');
    sep.append(static_cast<size_t>(t.dim() - d - 1), '\n').append(static_cast<size_t>(indent + 1), ' ');
    std::string out = "[";
    bool first = true;
    for (int64_t i : shown_indices(t.sizes()[d], summarize, opts.edgeitems)) {
      if (!first) out += sep;
      first = false;
      if (i < 0) out.append("...");
      else out.append(str(d + 1, offset + i * t.strides()[d], indent + 1));
    }
    return out + "]";
  }
};

// Appends ", suffix", or ",\n<indent>suffix" when the current line would pass linewidth.
std::string add_suffixes(std::string s, const std::vector<std::string>& suffixes, int64_t indent, int64_t linewidth) {
  size_t nl = s.rfind('\n');
  // Matches torch: len - rfind("\n") + 1, where rfind gives -1 when there is no newline.
  int64_t last_line_len = static_cast<int64_t>(s.size()) - (nl == std::string::npos ? -1 : static_cast<int64_t>(nl)) + 1;
  for (const auto& suffix : suffixes) {
    auto len = static_cast<int64_t>(suffix.size());
    if (last_line_len + len + 2 > linewidth) {
      s += ",\n" + std::string(indent, ' ') + suffix;
      last_line_len = indent + len;
    } else {
      s += ", " + suffix;
      last_line_len += len + 2;
    }
  }
  return s + ")";
}

}  // namespace

void set_print_options(const PrintOptions& options) {
  FG_CHECK(options.precision >= 0, ValueError, "set_print_options: precision must be >= 0, got {}", options.precision);
  FG_CHECK(options.edgeitems >= 0, ValueError, "set_print_options: edgeitems must be >= 0, got {}", options.edgeitems);
  FG_CHECK(options.linewidth > 0, ValueError, "set_print_options: linewidth must be > 0, got {}", options.linewidth);
  options_storage() = options;
}

const PrintOptions& print_options() { return options_storage(); }

std::string to_string(const Tensor& t) {
  if (!t.defined()) return "Tensor(undefined)";
  const PrintOptions& opts = print_options();
  const std::string prefix = "tensor(";
  const auto indent = static_cast<int64_t>(prefix.size());
  std::vector<std::string> suffixes;
  if (!t.is_cpu()) suffixes.push_back(fmt::format("device='{}'", t.device()));
  std::string body;
  if (t.numel() == 0) {
    // No element shows the dtype, so every non-default one is spelled out (and the shape unless it is [0]).
    if (t.dim() != 1) {
      std::string shape;
      for (int64_t s : t.sizes()) shape += fmt::format("{}, ", s);
      if (t.dim() > 1) shape.resize(shape.size() - 2);
      else if (t.dim() == 1) shape.resize(shape.size() - 1);
      suffixes.push_back(fmt::format("size=({})", shape));
    }
    if (t.dtype() != kDefaultFloat) suffixes.push_back(fmt::format("dtype={}", t.dtype()));
    body = "[]";
  } else {
    if (t.dtype() != kFloat32 && t.dtype() != kInt64 && t.dtype() != kBool) {
      suffixes.push_back(fmt::format("dtype={}", t.dtype()));
    }
    bool summarize = t.numel() > opts.threshold;
    ElementReader read(t);
    std::vector<Elem> shown;
    for_each_shown(t, read, summarize, opts.edgeitems, 0, t.storage_offset(), [&](const Elem& v) { shown.push_back(v); });
    Formatter formatter(t.dtype(), shown, opts.precision);
    body = Printer{t, read, formatter, opts, summarize}.str(0, t.storage_offset(), indent);
  }
  if (std::string fn = t.grad_fn_name(); !fn.empty()) suffixes.push_back(fmt::format("grad_fn=<{}>", fn));
  else if (t.requires_grad()) suffixes.push_back("requires_grad=True");
  return add_suffixes(prefix + body, suffixes, indent, opts.linewidth);
}

std::ostream& operator<<(std::ostream& os, const Tensor& t) { return os << to_string(t); }

std::string Tensor::to_string() const { return fg::to_string(*this); }

}  // namespace fg

/* See loc3r_aot_runtime.h. */
#include "loc3r_aot_runtime.h"

#include <dlfcn.h>
#include <string.h>

#include "loc3r_aot_kernels.h"

/* Driver entry points, resolved at run time. The typedefs spell out the classic ABI so
 * that cuda.h's versioned macros (cuFoo -> cuFoo_v2) cannot change what is looked up. */
typedef CUresult (*Loc3rCtxGetCurrent)(CUcontext *);
typedef CUresult (*Loc3rCtxGetDevice)(CUdevice *);
typedef CUresult (*Loc3rDeviceGetAttribute)(int *, CUdevice_attribute, CUdevice);
typedef CUresult (*Loc3rModuleLoadData)(CUmodule *, const void *);
typedef CUresult (*Loc3rModuleGetFunction)(CUfunction *, CUmodule, const char *);
typedef CUresult (*Loc3rFuncSetAttribute)(CUfunction, CUfunction_attribute, int);
typedef CUresult (*Loc3rLaunchKernel)(CUfunction, unsigned int, unsigned int, unsigned int, unsigned int,
                                      unsigned int, unsigned int, unsigned int, CUstream, void **, void **);

static struct {
  pthread_once_t once;
  int ok;
  char error[256];
  Loc3rCtxGetCurrent ctx_get_current;
  Loc3rCtxGetDevice ctx_get_device;
  Loc3rDeviceGetAttribute device_get_attribute;
  Loc3rModuleLoadData module_load_data;
  Loc3rModuleGetFunction module_get_function;
  Loc3rFuncSetAttribute func_set_attribute;
  Loc3rLaunchKernel launch_kernel;
} driver = {PTHREAD_ONCE_INIT, 0, "", NULL, NULL, NULL, NULL, NULL, NULL, NULL};

static void *resolve(void *lib, const char *name) {
  void *sym = dlsym(lib, name);
  if (!sym && !driver.error[0]) {
    strncpy(driver.error, "libcuda.so.1 lacks ", sizeof(driver.error) - 1);
    strncat(driver.error, name, sizeof(driver.error) - strlen(driver.error) - 1);
  }
  return sym;
}

static void open_driver(void) {
  void *lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
  if (!lib) {
    strncpy(driver.error, "libcuda.so.1 not found (no NVIDIA driver)", sizeof(driver.error) - 1);
    return;
  }
  driver.ctx_get_current = (Loc3rCtxGetCurrent)resolve(lib, "cuCtxGetCurrent");
  driver.ctx_get_device = (Loc3rCtxGetDevice)resolve(lib, "cuCtxGetDevice");
  driver.device_get_attribute = (Loc3rDeviceGetAttribute)resolve(lib, "cuDeviceGetAttribute");
  driver.module_load_data = (Loc3rModuleLoadData)resolve(lib, "cuModuleLoadData");
  driver.module_get_function = (Loc3rModuleGetFunction)resolve(lib, "cuModuleGetFunction");
  driver.func_set_attribute = (Loc3rFuncSetAttribute)resolve(lib, "cuFuncSetAttribute");
  driver.launch_kernel = (Loc3rLaunchKernel)resolve(lib, "cuLaunchKernel");
  driver.ok = !driver.error[0];
}

int loc3r_aot_driver_available(void) {
  pthread_once(&driver.once, open_driver);
  return driver.ok;
}

const char *loc3r_aot_driver_error(void) {
  pthread_once(&driver.once, open_driver);
  return driver.error;
}

const Loc3rAotImage *loc3r_aot_select_image(const Loc3rAotKernel *kernel, int major, int minor) {
  const Loc3rAotImage *best = NULL;
  for (int i = 0; i < kernel->num_images; ++i) {
    const Loc3rAotImage *img = &kernel->images[i];
    if (img->major == major && img->minor <= minor && (!best || img->minor > best->minor)) best = img;
  }
  return best;
}

Loc3rAotKernel *loc3r_aot_find(const char *name) {
  for (int i = 0; i < loc3r_aot_kernel_count; ++i)
    if (strcmp(loc3r_aot_kernels[i]->name, name) == 0) return loc3r_aot_kernels[i];
  return NULL;
}

/* Load the kernel's module into the current context (caller holds the lock). */
static CUresult load_for_current_context(Loc3rAotKernel *kernel, CUcontext ctx) {
  CUdevice dev;
  int major = 0, minor = 0;
  CUresult rc = driver.ctx_get_device(&dev);
  if (rc == CUDA_SUCCESS) rc = driver.device_get_attribute(&major, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev);
  if (rc == CUDA_SUCCESS) rc = driver.device_get_attribute(&minor, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev);
  if (rc != CUDA_SUCCESS) return rc;
  const Loc3rAotImage *img = loc3r_aot_select_image(kernel, major, minor);
  if (!img) return CUDA_ERROR_NO_BINARY_FOR_GPU;
  CUmodule module;
  CUfunction function;
  rc = driver.module_load_data(&module, img->data);
  if (rc == CUDA_SUCCESS) rc = driver.module_get_function(&function, module, kernel->function_name);
  if (rc == CUDA_SUCCESS && img->shared_bytes > 48 * 1024)
    rc = driver.func_set_attribute(function, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, img->shared_bytes);
  if (rc != CUDA_SUCCESS) return rc;
  kernel->state.context = ctx;
  kernel->state.module = module;
  kernel->state.function = function;
  kernel->state.shared_bytes = img->shared_bytes;
  return CUDA_SUCCESS;
}

CUresult loc3r_aot_launch(Loc3rAotKernel *kernel, CUstream stream, unsigned int grid_x, unsigned int grid_y,
                          unsigned int grid_z, void **params) {
  if (!loc3r_aot_driver_available()) return CUDA_ERROR_NOT_INITIALIZED;
  if (grid_x == 0 || grid_y == 0 || grid_z == 0) return CUDA_SUCCESS; /* empty problem */
  CUcontext ctx = NULL;
  CUresult rc = driver.ctx_get_current(&ctx);
  if (rc != CUDA_SUCCESS) return rc;
  if (!ctx) return CUDA_ERROR_INVALID_CONTEXT;
  pthread_mutex_lock(&kernel->state.lock);
  if (kernel->state.context != ctx) rc = load_for_current_context(kernel, ctx);
  CUfunction function = kernel->state.function;
  int shared = kernel->state.shared_bytes;
  pthread_mutex_unlock(&kernel->state.lock);
  if (rc != CUDA_SUCCESS) return rc;
  return driver.launch_kernel(function, grid_x, grid_y, grid_z, (unsigned int)(32 * kernel->num_warps), 1, 1,
                              (unsigned int)shared, stream, params, NULL);
}

/* Lists the AOT kernels built into libloc3r_aot and checks their embedded cubins.
 *
 * Runs without a GPU: it validates every image (ELF header, sm arch present) and reports
 * whether the CUDA driver could be opened. Exit status 0 when every image is well formed.
 */
#include <stdio.h>
#include <string.h>

#include "loc3r_aot_kernels.h"

static int is_elf(const Loc3rAotImage *img) {
  return img->size > 4 && memcmp(img->data, "\x7f" "ELF", 4) == 0;
}

int main(void) {
  int bad = 0;
  printf("loc3r AOT kernels: %d\n", loc3r_aot_kernel_count);
  for (int i = 0; i < loc3r_aot_kernel_count; ++i) {
    const Loc3rAotKernel *k = loc3r_aot_kernels[i];
    printf("%s fn=%s warps=%d", k->name, k->function_name, k->num_warps);
    for (int j = 0; j < k->num_images; ++j) {
      const Loc3rAotImage *img = &k->images[j];
      int ok = is_elf(img);
      bad += !ok;
      printf(" sm_%d%d:%zuB,smem=%d%s", img->major, img->minor, img->size, img->shared_bytes, ok ? "" : ",NOT-ELF");
    }
    printf("\n");
  }
  if (loc3r_aot_driver_available())
    printf("CUDA driver: available\n");
  else
    printf("CUDA driver: unavailable (%s)\n", loc3r_aot_driver_error());
  return bad ? 1 : 0;
}

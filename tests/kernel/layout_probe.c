/* layout_probe.c — compiles bpf/nodeagent.h on its own, so test_structs.py can read
 * clang's layout of every map key and value (bcc's table descriptions) and the map
 * definitions the kernel got, and compare them with nodeagent/capture/structs.py. */
#include "nodeagent.h"

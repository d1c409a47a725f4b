/* bg_semaphore.h - C-level access to batchgate.Semaphore for other binding
 * files (the dispatcher shares the semaphore's native counter). */
#ifndef BATCHGATE_BG_SEMAPHORE_H
#define BATCHGATE_BG_SEMAPHORE_H

#include "bg_module.h"
#include "bg_sem.h"

/* The native counter of a batchgate.Semaphore (or BoundedSemaphore, or a
 * subclass), as a new reference: release it with bg_sem_decref(). The counter
 * outlives the Python object if needed. Returns NULL with TypeError set when
 * obj is not one, or RuntimeError when its __init__ never ran. GIL held. */
bg_sem *bg_semaphore_core(bg_state *st, PyObject *obj);

#endif /* BATCHGATE_BG_SEMAPHORE_H */

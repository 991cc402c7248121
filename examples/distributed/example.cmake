# examples/distributed: data-parallel LoRA-Pro over MPI (Debian: libopenmpi-dev openmpi-bin).
# Built only when MPI is found. Included by examples/CMakeLists.txt with LOWRANK_EXAMPLE_NAME/_DIR.
find_package(MPI COMPONENTS CXX)
if(MPI_CXX_FOUND)
  add_executable(${LOWRANK_EXAMPLE_NAME} ${LOWRANK_EXAMPLE_DIR}/main.cpp)
  target_link_libraries(${LOWRANK_EXAMPLE_NAME} PRIVATE lowrank::lowrank lowrank_dev_flags MPI::MPI_CXX)
  if(LOWRANK_BUILD_TESTS AND MPIEXEC_EXECUTABLE)
    # Two ranks, checked against the single-process run inside the program (non-zero exit on a
    # mismatch). Open MPI refuses to run as root and to start more ranks than cores unless told;
    # the environment variables below are its documented equivalents of --allow-run-as-root and
    # --oversubscribe, and other MPI implementations ignore them.
    add_test(NAME example_distributed_np2
             COMMAND ${MPIEXEC_EXECUTABLE} ${MPIEXEC_NUMPROC_FLAG} 2 ${MPIEXEC_PREFLAGS}
                     $<TARGET_FILE:${LOWRANK_EXAMPLE_NAME}> ${MPIEXEC_POSTFLAGS})
    set_tests_properties(example_distributed_np2 PROPERTIES
      TIMEOUT 120
      PROCESSORS 2
      ENVIRONMENT "OMPI_ALLOW_RUN_AS_ROOT=1;OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1;OMPI_MCA_rmaps_base_oversubscribe=1")
  endif()
else()
  message(STATUS "examples/distributed is not built: MPI not found (Debian: apt-get install libopenmpi-dev openmpi-bin)")
endif()

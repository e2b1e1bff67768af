from mergekit_pcb.cli import main

main()
